# One image for every genset service; the compose file picks the service with the command.
#   docker build -t genset .
#   docker run --rm genset --help
# Torch is only needed by `genset worker --engine torch`. The default spec takes whatever the
# index offers; on CPU-only hosts pass a CPU build, e.g. --build-arg TORCH_SPEC=torch==2.13.0
# (with PIP_EXTRA_INDEX_URL pointing at an index that has it), or TORCH_SPEC="" to leave torch
# out (mocker workers, frontend and router do not import it).
FROM python:3.11-slim

ARG TORCH_SPEC="torch>=2.4"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GENSET_LOG_FORMAT=json

WORKDIR /app

# Dependencies first, so code edits do not reinstall them.
COPY pyproject.toml README.md ./
COPY proto/__init__.py proto/__init__.py
COPY genset/__init__.py genset/__init__.py
COPY services/__init__.py services/__init__.py
# The k8s extra (the Kubernetes API client) is what `genset planner --connector kubernetes`
# needs in deploy/k8s/planner.yaml; nothing else imports it.
RUN if [ -n "$TORCH_SPEC" ]; then pip install "$TORCH_SPEC" safetensors; fi \
 && pip install ".[k8s]"

COPY proto proto
COPY genset genset
COPY services services
RUN pip install --no-deps . && genset --help >/dev/null

# Services run as an unprivileged user; state (if any) goes under /app/.state.
RUN useradd --create-home --uid 10001 genset && mkdir -p /app/.state && chown genset /app/.state
USER genset

ENTRYPOINT ["genset"]
CMD ["--help"]
