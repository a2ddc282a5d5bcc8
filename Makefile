# The README's two commands: `make run` and `make test`. Each sets up .venv itself on a fresh
# machine, so either can come first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

# Torch: CPU build on machines without an NVIDIA GPU (torch==2.13.0 is a CPU wheel on these
# machines' disk; a bare `torch` would pull a multi-GB CUDA build).
TORCH_SPEC := $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo 'torch>=2.4'; else echo 'torch==2.13.0'; fi)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test,torch]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/genset up $(ARGS)

# pytest exits 5 when it collects nothing: that must fail, not pass silently.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -m "not slow" -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; test $$rc -eq 0
	$(PY) -m pytest tests -m slow -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no slow tests" >&2; exit 1; fi; test $$rc -eq 0

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .state .pytest_cache
