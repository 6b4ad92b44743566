# make pretrain: set up, prepare the preset's data, pretrain the preset for this machine, sample.
#                The demo presets train on the shipped corpus; rodin-1b, 3090 and b200 on the French corpus
#                that the data pipeline builds first (make pretrain PRESET=3090 MAX_BYTES=5G, see below).
# make sft:      fine-tune the newest checkpoint of runs/demo into a chat model, runs/demo-sft.
# make chat:     talk to it (rodin chat runs/demo-sft).
# make test:     set up and run the test suite on CPU.
# make export:   export runs/demo to Hugging Face (runs/demo/export/hf) and GGUF + Modelfile (runs/demo/export/gguf), verified.
# make eval:     lm-evaluation-harness on a run's newest checkpoint: make eval RUN=runs/demo TASKS=french_bench
# TORCH picks the torch requirement (CI pins the CPU build on its disk): make test TORCH='torch>=2.9'
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# PY given on the command line (make bench-gpu PY=python3): that interpreter as it is, nothing installed
OWN_PY := $(filter command line,$(origin PY))
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

# The French corpus of RODIN-1B: FR_DATA is the data_dir (shards and tokenizer.model) of the presets in
# FR_PRESETS (rodin/config.py). Five stages of the data pipeline make it (README, "Data pipeline"), each
# skipped once done (a stamp), resumed where it stopped when interrupted (the stage's own state), and
# redone when the stage before it was. MAX_BYTES: the download budget per source; VOCAB: the tokenizer's.
FR_PRESETS := rodin-1b 3090 b200
FR_DATA ?= data/fr
FR_WORK ?= data/fr-work
REGISTRY ?= data/sources.json
# not cc100: it has no Hub route, its file is fetched by hand (data/sources.json says how)
FR_SOURCES ?= wikipedia,wikisource,hplt,pleias_books,pleias_newspapers,legi
MAX_BYTES ?= 20G
VOCAB ?= 64000
MIX_ARGS ?=
FR_PRESET := $(filter $(PRESET),$(FR_PRESETS))
DATA_ARGS := $(if $(FR_PRESET),--data_dir=$(FR_DATA) --tokenizer=$(FR_DATA)/tokenizer.model)

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

# a new budget is a new stamp: the download continues from its state.json up to it
$(FR_WORK)/raw/.downloaded-$(MAX_BYTES): | $(VENV)/.installed
	$(PY) data/download.py --registry=$(REGISTRY) --sources=$(FR_SOURCES) --out_dir=$(FR_WORK)/raw --max_bytes=$(MAX_BYTES)
	touch $@

# a clean that finished on other raw data (its stamp is older) starts over; an interrupted one resumes
$(FR_WORK)/clean/.cleaned: $(FR_WORK)/raw/.downloaded-$(MAX_BYTES)
	if [ -e $@ ]; then rm -rf $(FR_WORK)/clean; fi
	$(PY) data/clean.py $(FR_WORK)/raw --out_dir=$(FR_WORK)/clean --sources=$(FR_SOURCES)
	touch $@

$(FR_WORK)/mix.json: $(FR_WORK)/clean/.cleaned
	$(PY) data/mix.py $(FR_WORK)/clean --out=$@ $(MIX_ARGS)

$(FR_DATA)/tokenizer.model: $(FR_WORK)/mix.json
	$(PY) data/train_tokenizer.py --mixture=$< --out=$@ --vocab_size=$(VOCAB)

# encode starts over by itself when the mixture or the tokenizer changed (encode_state.json)
$(FR_DATA)/.encoded: $(FR_DATA)/tokenizer.model
	$(PY) data/encode.py --mixture=$(FR_WORK)/mix.json --tokenizer=$< --out_dir=$(FR_DATA)
	touch $@

data: $(if $(FR_PRESET),$(FR_DATA)/.encoded,$(DEMO)/train-00000.bin)

# relaunching resumes from the newest complete checkpoint of runs/demo
pretrain: data
	$(LAUNCH) train.py --preset=$(PRESET) $(DATA_ARGS) $(ARGS)

resume: pretrain

spot: data
	$(PY) -m rodin supervise --run_dir=runs/$(NAME) -- $(SPOT_LAUNCH) train.py --preset=$(PRESET) --name=$(NAME) \
		$(DATA_ARGS) $(if $(MIRROR),--mirror=$(MIRROR)) $(if $(NOTIFY),--notify=$(NOTIFY)) $(ARGS)

# relaunching resumes from the newest complete checkpoint of runs/demo-sft
sft: install
	$(PY) sft.py --preset=$(PRESET) $(ARGS)

chat: install
	$(PY) -m rodin chat runs/demo-sft $(ARGS)

test: install
	$(PY) -m pytest -q tests $(ARGS)

export: install
	$(PY) export.py $(RUN) --format=hf $(ARGS)
	$(PY) export.py $(RUN) --format=gguf $(ARGS)

# on a CUDA machine, within ~9 minutes: the `gpu` tests and every GPU figure appended to bench/RESULTS.md
# (bench/gpu.py: rodin-1b at context 2048 against transformers, compiled and eager; the 3090 preset under
# a 24 GiB cap; memory estimates against the allocator; Muon against AdamW; FSDP2 over NCCL); each item
# runs even if one fails. Offline, with the machine's own Python: make bench-gpu PY=python3 OUT=folder
# (OUT: where the log and the new rows are copied as each item ends)
OUT ?=
bench-gpu: $(if $(OWN_PY),,install)
	$(PY) bench/gpu.py $(if $(OUT),--out=$(OUT)) $(ARGS)

eval: install
	$(PY) -m rodin eval $(RUN) --tasks=$(TASKS) --num_fewshot=3 $(ARGS)

clean:
	rm -rf runs $(DEMO)
