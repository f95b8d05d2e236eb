# On a fresh machine `make demo` and `make test` each set everything up first (`make setup`);
# `make lint` and `make test-fast` are the quick checks. Every target is idempotent.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
# All caches live in the ignored .cache/ so every rank, CI run and `make` call shares them.
export DS_GPT_CACHE ?= $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR ?= $(DS_GPT_CACHE)/torch_extensions
export TIKTOKEN_CACHE_DIR ?= $(DS_GPT_CACHE)/tiktoken
EXTRAS ?=
DEMO_OUT ?= out/demo
# Extra trainer flags for the demo, e.g. DEMO_ARGS="--max_iters 100" for a shorter run.
DEMO_ARGS ?=

.PHONY: setup demo test test-fast lint

# `make setup EXTRAS=hf` also installs requirements-hf.txt (transformers, for Hugging Face interop).
setup: $(VENV)/.installed $(foreach e,$(EXTRAS),$(VENV)/.installed-$(e)) $(VENV)/.installed-ds_gpt
	$(PY) -m ds_gpt.assets
	$(PY) -m ds_gpt.ops

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# ds_gpt itself, editable: `python -m ds_gpt.*` and `import ds_gpt` work from any directory.
# --no-deps: the pins above are the whole stack; pip must not resolve them a second time.
$(VENV)/.installed-ds_gpt: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-%: requirements-%.txt $(VENV)/.installed
	$(PY) -m pip install -q -r $<
	touch $@

# deepspeed --log_level warning: the launcher's INFO lines describe its own start-up, and on CPU
# one of them ("Setting CUDA_VISIBLE_DEVICES=0,1") names GPUs the ranks never use.
demo: setup
	$(PY) -m ds_gpt.prepare --dataset shakespeare
	deepspeed --log_level warning --num_gpus 2 ds_gpt/train.py --deepspeed_config ds_configs/zero1.json \
		--config config/demo_cpu.toml --out_dir $(DEMO_OUT) $(DEMO_ARGS)
	$(PY) -m ds_gpt.sample --out_dir $(DEMO_OUT) --start "ROMEO:" --num_samples 1 \
		--max_new_tokens 60 --temperature 0.8 --top_k 200 --seed 1337
	$(PY) -m ds_gpt.report --out_dir $(DEMO_OUT)
	@echo "metrics: $(DEMO_OUT)/metrics.jsonl  report: $(DEMO_OUT)/report.md  tensorboard: tensorboard --logdir $(DEMO_OUT)/tb"

# The suite checks Hugging Face interop against transformers itself, so tests need the hf extra.
test: setup $(VENV)/.installed-hf $(VENV)/.installed-wandb $(VENV)/.installed-eval
	$(PY) -m pytest -q --durations=20

# pyflakes, pycodestyle, import order and bugbear (pyproject.toml); CI runs it before the tests.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test-fast: setup $(VENV)/.installed-hf $(VENV)/.installed-wandb $(VENV)/.installed-eval
	$(PY) -m pytest -q -m 'not slow'
