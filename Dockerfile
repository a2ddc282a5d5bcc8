# One image for every genset service; the compose file picks the service with the command.
#   docker build --target slim -t genset:slim .     # no torch: frontend, router, mocker workers
#   docker build --target torch -t genset:torch .   # + torch: torch workers (the default target)
#   docker run --rm genset:slim --help
#
# Build arguments:
#   BASE_IMAGE  any Debian-like image with python3 (>= 3.11) and its venv module
#               (default python:3.11-slim; the offline compose variant uses a base built from
#               Debian's packages, see deploy/docker/base-image.sh)
#   TORCH_SPEC  the torch requirement of the torch target. The default takes what the index
#               offers, which on PyPI for Linux is a CUDA build of several GB (right for GPU
#               hosts). For CPU-only hosts pass a CPU build, e.g. TORCH_SPEC=torch==2.13.0 with
#               PIP_EXTRA_INDEX_URL pointing at PyTorch's CPU wheel index.
# A private CA (a TLS-intercepting proxy between the build and the index) goes in as the build
# secret `pip_cert`, so it is trusted during the build and never stored in a layer:
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt ...
# RUN --mount needs BuildKit (Docker >= 18.09 with DOCKER_BUILDKIT=1; the default since 23.0).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/genset \
    PATH=/opt/genset/bin:$PATH \
    GENSET_LOG_FORMAT=json
# A venv, not the system Python: Debian's python3 refuses pip installs outside one (PEP 668),
# and the same line works on python:3.11-slim.
RUN python3 -m venv /opt/genset
WORKDIR /app
# Dependencies first, read from pyproject.toml alone, so code edits do not reinstall them.
# The k8s extra (the Kubernetes API client) is for `genset planner --connector kubernetes`.
# setuptools is what installing genset itself needs (no build isolation, so no index later).
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['k8s']))" > /tmp/requirements.txt \
 && pip install -q -r /tmp/requirements.txt 'setuptools>=68' \
 && rm /tmp/requirements.txt

# The torch engine's extra on top: the only multi-GB layer, kept out of the slim target.
FROM deps AS torch-deps
ARG TORCH_SPEC="torch>=2.4"
# Where pip may also look for torch: another index (PIP_EXTRA_INDEX_URL) or a directory of
# wheels served over HTTP (PIP_FIND_LINKS, e.g. `python3 -m http.server` on the build host
# with --network host). Plain URLs, no credentials: build arguments stay in the image history.
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && pip install -q "$TORCH_SPEC" 'safetensors>=0.4'

# genset itself, installed from the build context through a bind mount (its writes, such as
# build/, are thrown away), then an unprivileged user. The same lines end both targets.
# /data/offload is the offload store's disk tier: Docker gives a fresh named volume mounted
# there this directory's owner, so the unprivileged user can write it (a directory missing
# from the image would come up root's).
FROM deps AS slim
RUN --mount=type=bind,target=/src,rw \
    pip install -q --no-deps --no-build-isolation /src && genset --help >/dev/null \
 && useradd --create-home --uid 10001 genset \
 && mkdir -p /app/.state /data/offload && chown genset /app/.state /data/offload
USER genset
ENTRYPOINT ["genset"]
CMD ["--help"]

# `ENGINE=mocker docker compose ...` builds target "mocker": the slim image under that name.
FROM slim AS mocker

FROM torch-deps AS torch
RUN --mount=type=bind,target=/src,rw \
    pip install -q --no-deps --no-build-isolation /src && genset --help >/dev/null \
 && useradd --create-home --uid 10001 genset \
 && mkdir -p /app/.state /data/offload && chown genset /app/.state /data/offload
USER genset
ENTRYPOINT ["genset"]
CMD ["--help"]
