# CPU machines take the CPU build of torch from this pin; GPU users install torch (or vllm) first.
PYTHON ?= python
TORCH_CPU ?= torch==2.13.0

.PHONY: install install-gpu demo test test-fast lint bench bench-learning

install:
	$(PYTHON) -m pip install -q "$(TORCH_CPU)"
	DS_BUILD_OPS=0 $(PYTHON) -m pip install -q -e ".[deepspeed,test]"

install-gpu:
	$(PYTHON) -m pip install -e ".[deepspeed,vllm,test]"

demo:
	$(PYTHON) -m srpo_trl.demo

test:
	$(PYTHON) -m pytest -q tests

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" tests

lint:
	$(PYTHON) -m ruff check srpo_trl tests examples
	$(PYTHON) -m ruff format --check srpo_trl tests examples

bench:
	$(PYTHON) benchmarks/step_cost.py --write-results

bench-learning:
	$(PYTHON) benchmarks/learning/run.py
