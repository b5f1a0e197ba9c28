# The two commands the README starts with: `make demo` and `make test`. Both set up .venv first when needed, then
# the data step (`make data`), so a machine that has never seen the project needs nothing else.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SETUP_GIB := 8

.PHONY: setup data demo single test bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	@test -x $(PY) || $(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; sys.exit(0 if free >= $(SETUP_GIB) else \
		f'error: {free:.1f} GiB free here; the virtual environment (torch with its CUDA libraries) and the tests need about $(SETUP_GIB) GiB: free some disk space and rerun')"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST (the demo's and the tests' offline data): found where the loader looks, else Debian's
# dataset-fashion-mnist through apt-get (as root or with sudo), else torchvision's download into
# $CDL_DATA_ROOT or ~/.cache/cdl/data. Does nothing when the files are there.
data: $(STAMP)
	$(PY) -m cdl_core.data.obtain

# The smoke sweep on the embedded defaults: local Ray, sqlite MLflow/Optuna stores here, offline Fashion-MNIST,
# demo backbones. Each invocation is a new sweep (timestamped name, its own MLflow experiment); teachers
# stored by an earlier demo (ray_results/teachers) are reused.
demo: data
	$(PY) -m orchestrator.sweep --space smoke --name smoke-$$(date +%Y%m%d-%H%M%S)

# One cdl_core run, no Ray: teacher -> CDL-Prompt student -> student alone, printed side by side.
single: data
	$(PY) -m cdl_core.run --teacher demo-t --student demo-s --method coda --kd cdl_prompt --dataset fashion_mnist --epochs 1 --batch-size 16 --out outputs/single.json

test: data
	$(PY) -m pytest -q --durations=30

# The README's "Performance" numbers: each prints its ratios, measured side by side in one run.
bench: data
	$(PY) bench/step_throughput.py
	$(PY) bench/sweep_overhead.py
	$(PY) bench/teacher_reuse.py

clean:
	rm -rf $(VENV) outputs .pytest_cache ray_results mlflow.db optuna.db
