# The README's two commands: `make demo` and `make test`. Both set up .venv when needed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: setup test demo demo-teacher bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/ds2d2 demo --out $(DEMO_OUT)

# Maintainers: retrain the demo teacher shipped in ds2d2_cli/assets/ (about 35 min on 2 cores; resumable).
demo-teacher: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python -c "from ds2d2_cli.cli.common import RichReporter; \
	from ds2d2_cli.demo import make_shipped_teacher; print(make_shipped_teacher('runs/demo-teacher', reporter=RichReporter()))"

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/run_all.py

# Every stage on one CUDA GPU in under 8 minutes -> benchmarks/results/gpu_check.json (README, Benchmarks);
# GPU_CHECK_ARGS=--dry-run-cpu runs the same plan on the CPU at tiny sizes.
gpu-check: $(STAMP)
	$(VENV)/bin/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
