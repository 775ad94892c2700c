# `make demo` and `make test` create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench bench-gpu gpu-wheels gpu-data clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,cpu]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m trainer demo --out demo_out

# Two workers; a module's tests share one (tests/conftest.py groups them), the slowest groups first.
PYTEST := $(PY) -m pytest -n 2 --dist loadgroup --no-loadscope-reorder

test: $(STAMP)
	$(PY) -m ruff check .
	$(PYTEST)

# For the edit-test loop; CI runs `make test`. Leaves out the tests that train (marked slow) and the
# one that builds the function image's Python environment (marked image).
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PYTEST) -m "not slow and not image"

# datumaro is the baseline of bench_parse.py only; it lives in its own venv, not the product's.
.venv-bench/.installed:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install --quiet datumaro
	touch $@

bench: $(STAMP) .venv-bench/.installed
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The GPU suite (docs/benchmarks.md). It runs from a bare Python with torch: gpu-wheels downloads the
# other packages it needs that such a machine lacks, for Python 3.12 on x86_64, into .whl/; gpu-data
# copies the BCCD export into .bccd/. Both folders are ignored by git and carried to the GPU machine.
GPU_WHEELS := nuclio-sdk==0.6.3 faster-coco-eval==1.8.0
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
BCCD_ZIP ?= ../shared/datasets/bccd/bccd_cvat11.zip

bench-gpu:
	PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash benchmarks/gpu_suite.sh

gpu-wheels: $(STAMP)
	rm -rf .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl $(GPU_WHEELS)

gpu-data:
	mkdir -p .bccd
	cp $(BCCD_ZIP) .bccd/bccd_cvat11.zip

clean:
	rm -rf demo_out .pytest_cache .ruff_cache
