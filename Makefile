# make pretrain: set up, prepare the shipped corpus, pretrain the preset for this machine, sample.
# make sft:      fine-tune the newest checkpoint of runs/demo into a chat model, runs/demo-sft.
# make chat:     talk to it (python -m rodin.chat runs/demo-sft).
# make test:     set up and run the test suite on CPU.
# make export:   export runs/demo to Hugging Face (runs/demo/export/hf) and GGUF + Modelfile (runs/demo/export/gguf), verified.
# make eval:     lm-evaluation-harness on a run's newest checkpoint: make eval RUN=runs/demo TASKS=french_bench
# TORCH picks the torch requirement (CI pins the CPU build on its disk): make test TORCH='torch>=2.6'
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
CORPUS := data/littre-citations.txt.gz
DEMO := data/demo
PRESET ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu-demo || echo cpu-demo)
ARGS ?=
# NPROC > 1: one node under torchrun (FSDP2), e.g. make pretrain PRESET=b200 NPROC=8
NPROC ?= 1
LAUNCH := $(if $(filter 1,$(NPROC)),$(PY),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC))

# make spot: the run under the supervisor (relaunch with backoff until complete), mirrored and watched:
#   make spot PRESET=b200 NPROC=8 NAME=rodin-1b MIRROR=s3://bucket/rodin-1b NOTIFY=https://ntfy.sh/my-topic
NAME ?= demo
MIRROR ?=
NOTIFY ?=
SPOT_LAUNCH := $(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) --max-restarts=3

RUN ?= runs/demo
# llama-cpp-python (dev extra) compiles llama.cpp: portable code, not tuned to the building CPU
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

TASKS ?= french_bench

.PHONY: install data pretrain resume spot sft chat test export eval bench-gpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(DEMO)/tokenizer.model: $(CORPUS) $(VENV)/.installed
	$(PY) data/train_tokenizer.py $(CORPUS) --model=demo --out=$@

$(DEMO)/train-00000.bin: $(DEMO)/tokenizer.model
	$(PY) data/encode.py $(CORPUS) --tokenizer=$< --out_dir=$(DEMO)

data: $(DEMO)/train-00000.bin

# relaunching resumes from the newest complete checkpoint of runs/demo
pretrain: data
	$(LAUNCH) train.py --preset=$(PRESET) $(ARGS)

resume: pretrain

spot: data
	$(PY) -m rodin.supervise --run_dir=runs/$(NAME) -- $(SPOT_LAUNCH) train.py --preset=$(PRESET) --name=$(NAME) \
		$(if $(MIRROR),--mirror=$(MIRROR)) $(if $(NOTIFY),--notify=$(NOTIFY)) $(ARGS)

# relaunching resumes from the newest complete checkpoint of runs/demo-sft
sft: install
	$(PY) sft.py --preset=$(PRESET) $(ARGS)

chat: install
	$(PY) -m rodin.chat runs/demo-sft $(ARGS)

test: install
	$(PY) -m pytest -q tests $(ARGS)

export: install
	$(PY) export.py $(RUN) --format=hf $(ARGS)
	$(PY) export.py $(RUN) --format=gguf $(ARGS)

# on a CUDA machine, within ~9 minutes: the `gpu` tests and every GPU figure appended to bench/RESULTS.md
# (bench/gpu.py: rodin-1b at context 2048 against transformers, eager and compiled; the 3090 preset under
# a 24 GiB cap; memory estimates against the allocator; FSDP2 over NCCL); each item runs even if one fails
bench-gpu: install
	$(PY) bench/gpu.py $(ARGS)

eval: install
	$(PY) -m rodin.eval $(RUN) --tasks=$(TASKS) --num_fewshot=3 $(ARGS)

clean:
	rm -rf runs $(DEMO)
