# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONHASHSEED ?= 0

.PHONY: demo test test-fast test-cpu-kind test-jax test-torch bench install venvs lint docs clean

# The TensorFlow environment is byte-compiled at install (pip's default), although that is most of an install's
# CPU time: with PYTHONDONTWRITEBYTECODE set, as on CI, every process would compile what it imports (measured:
# the TensorFlow suite took 17:06 instead of 15:13, its subprocess tests twice as long).
PIP_INSTALL := -m pip install -q
# The JAX and torch environments skip it: their cores start few processes (measured: the torch core 1:26
# without against 1:29 with, the JAX core 3:19 against 3:10), and compiling torch alone is 25 CPU-seconds.
PIP_INSTALL_BACKEND := -m pip install -q --no-compile

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_INSTALL) --upgrade pip
	$(PY) $(PIP_INSTALL) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m autoprec demo --output reports/demo

PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

# The three environments at once (-j3): their downloads overlap.
venvs:
	@$(MAKE) --no-print-directory -j3 -O $(VENV)/.installed $(JAX_VENV)/.installed $(TORCH_VENV)/.installed

# Two workers, one test file each at a time: CI has 2 cores. The whole suite under TensorFlow in the
# foreground; meanwhile the JAX and torch environments install and run their core at the lowest CPU priority
# (nice 19), so they take only the time the suite leaves a core idle (about a tenth of it: a worker waiting on
# a subprocess, the last file's tail) and never slow it; their output follows the suite's, and either failing
# fails the target. Tests whose outcome can depend on the kind of CPU (target="auto", device="this") are marked
# cpu_kind and run twice in the suite, as on this kind and as on the other (tests/conftest.py; it fails a test
# that reaches them unmarked), so both kinds are covered whichever machine runs it.
test: $(VENV)/.installed
	@log=$$(mktemp); \
	nice -n 19 $(MAKE) --no-print-directory -j2 -O test-jax test-torch >"$$log" 2>&1 & backends=$$!; \
	trap 'rm -f "$$log"; kill 0' INT TERM; \
	$(PYTEST); suite=$$?; \
	echo "== the JAX and torch cores (started alongside the TensorFlow suite, at nice 19)"; \
	wait $$backends; others=$$?; cat "$$log"; rm -f "$$log"; \
	test $$suite -eq 0 && test $$others -eq 0

# A developer's quick loop: everything not marked slow.
test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow"

# Only the tests that depend on the kind of CPU, both kinds.
test-cpu-kind: $(VENV)/.installed
	$(PYTEST) -m cpu_kind tests

# The JAX backend, in an environment without TensorFlow: the core that runs under every backend.
JAX_VENV ?= .venv-jax
# With the GPU benchmark's dry run (benchmarks/gpu.py at toy sizes), in the same two workers. As under torch, the
# core is where the backend does the work: the bounds and the search read the per-sample values the engine returns,
# the same numbers on every backend, so they run under TensorFlow only.
JAX_CORE := tests/test_gpu_benchmark.py tests/test_policy.py tests/test_apply.py tests/test_engine.py \
	tests/test_measured.py tests/test_tuner.py::test_planted_regions_end_float32_and_the_rest_16bit \
	tests/test_sensitivity.py::test_a_rare_overflow_is_found_when_the_gradients_read_fewer_samples

$(JAX_VENV)/.installed: pyproject.toml
	test -x $(JAX_VENV)/bin/python || $(PYTHON) -m venv $(JAX_VENV)
	$(JAX_VENV)/bin/python $(PIP_INSTALL_BACKEND) --upgrade pip
	$(JAX_VENV)/bin/python $(PIP_INSTALL_BACKEND) "jax[cpu]>=0.10" "keras>=3.15" "optuna>=5.0" "pandas>=3.1" "numpy>=2.4" \
		"matplotlib>=3.11" "scikit-learn>=1.9" "pytest>=9.0" "pytest-xdist>=3.8" "hypothesis>=6.170"
	# KerasHub without its TensorFlow-only dependency (tensorflow-text): what a JAX user's environment holds.
	$(JAX_VENV)/bin/python $(PIP_INSTALL_BACKEND) --no-deps "keras-hub>=0.32"
	$(JAX_VENV)/bin/python $(PIP_INSTALL_BACKEND) absl-py regex rich packaging "tokenizers>=0.20" sentencepiece
	$(JAX_VENV)/bin/python $(PIP_INSTALL_BACKEND) --no-deps -e .
	touch $@

test-jax: $(JAX_VENV)/.installed
	@! $(JAX_VENV)/bin/python -c "import tensorflow" 2>/dev/null || (echo "TensorFlow is installed in $(JAX_VENV)"; exit 1)
	KERAS_BACKEND=jax $(JAX_VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m "not slow or gpu_benchmark" $(JAX_CORE)

# The PyTorch backend (CPU build), without TensorFlow: the core that holds there, where the backend does the work
# (policies, apply/save/load, the engine, measured steps, a tune end to end), as under JAX. The
# planted-hazard tune runs for bfloat16 only: trained under torch's own random streams, the planted float16
# offset region (d6) costs 0.0037 of accuracy on its own there (0.015 under TensorFlow), inside the 0.5%
# budget, so keeping it 16-bit is right.
TORCH_VENV ?= .venv-torch
TORCH_CORE := tests/test_policy.py tests/test_apply.py tests/test_engine.py tests/test_measured.py \
	"tests/test_tuner.py::test_planted_regions_end_float32_and_the_rest_16bit[mixed_bfloat16]"

$(TORCH_VENV)/.installed: pyproject.toml
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python $(PIP_INSTALL_BACKEND) --upgrade pip
	$(TORCH_VENV)/bin/python $(PIP_INSTALL_BACKEND) "torch==2.13.0" "keras>=3.15" "optuna>=5.0" "pandas>=3.1" "numpy>=2.4" \
		"matplotlib>=3.11" "scikit-learn>=1.9" "pytest>=9.0" "pytest-xdist>=3.8" "hypothesis>=6.170"
	$(TORCH_VENV)/bin/python $(PIP_INSTALL_BACKEND) --no-deps -e .
	touch $@

test-torch: $(TORCH_VENV)/.installed
	@! $(TORCH_VENV)/bin/python -c "import tensorflow" 2>/dev/null || (echo "TensorFlow is installed in $(TORCH_VENV)"; exit 1)
	KERAS_BACKEND=torch $(TORCH_VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m "not slow" $(TORCH_CORE)

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
	rm -rf $(VENV) $(JAX_VENV) $(TORCH_VENV) build site *.egg-info
