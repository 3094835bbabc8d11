PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint format bench bench-deploy bench-int8 bench-reconstruction bench-flows bench-one-class

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/anomalens demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest -q -n 4 --dist loadscope

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/patchcore.py --json benchmarks/out/patchcore.json

bench-deploy: $(STAMP)
	$(PY) benchmarks/onnx_runtime.py --json benchmarks/out/onnx_runtime.json
	$(PY) benchmarks/load_test.py --json benchmarks/out/load_test.json

bench-int8: $(STAMP)
	$(PY) benchmarks/int8.py --json benchmarks/out/int8.json

bench-reconstruction: $(STAMP)
	nice -n 5 $(PY) benchmarks/reconstruction.py --json benchmarks/out/reconstruction.json

bench-flows: $(STAMP)
	$(PY) benchmarks/flows.py --tile-every 1 --json benchmarks/out/flows.json

MODEL ?= gaussian
bench-one-class: $(STAMP)
	$(PY) benchmarks/one_class.py --model $(MODEL) --max-train 2000 --threads 2 \
		--json benchmarks/out/one_class_$(MODEL).json
