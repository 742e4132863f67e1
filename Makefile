# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONHASHSEED ?= 0

.PHONY: demo test test-fast test-other-cpu bench install lint docs clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m autoprec demo --output reports/demo

PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile
# The other kind of CPU than this one: 0 (no fast bf16) on a CPU with AVX512_BF16/AMX, else 1.
OTHER_CPU = $$(env -u AUTOPREC_CPU_FAST_BF16 $(PY) -c "from autoprec.backends import cpu_has_fast_bf16 as f; print(0 if f() else 1)")

# Two workers, one test file each at a time: CI has 2 cores. The whole suite on this machine's kind of CPU,
# then the fast core as on the other kind (AUTOPREC_CPU_FAST_BF16 forces the local device profile), so that
# both kinds are covered whichever machine runs it.
test: $(VENV)/.installed
	$(PYTEST)
	$(MAKE) --no-print-directory test-other-cpu

# A developer's quick loop: everything not marked slow.
test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow"

test-other-cpu: $(VENV)/.installed
	@kind=$(OTHER_CPU); echo "autoprec: the fast core again, as on a CPU with AUTOPREC_CPU_FAST_BF16=$$kind"; \
	AUTOPREC_CPU_FAST_BF16=$$kind $(PYTEST) -m "not slow"

# The linter, the formatter (checking only) and the type checker, as configured in pyproject.toml.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy autoprec

# The documentation site (mkdocs.yml, docs/) into site/; any warning fails the build.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py --output reports/benchmarks.md

clean:
	rm -rf $(VENV) build site *.egg-info
