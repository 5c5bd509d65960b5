# User entry points. Every target that runs Python depends on .venv, so each works from a
# fresh clone with no other step.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Ranks to train on (make demo NPROC=2): above 1, torchrun starts them on this machine, the
# experts sharded and everything else data-parallel (lstm_moe.distributed). The `--` keeps
# torchrun from reading `--run` as an abbreviation of its own `--run-path`.
NPROC ?= 1
TRAIN = $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone \
	--nproc_per_node=$(NPROC) -m lstm_moe.train --,$(PY) -m lstm_moe.train)
# Beam-search decoding on the same ranks (each decodes its share; the experts stay sharded).
TRANSLATE = $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone \
	--nproc_per_node=$(NPROC) -m eval.translate --,$(PY) -m eval.translate)

.PHONY: setup test lint format bench bench-parallel bench-translation bench-transformer demo demo-lm demo-translation compare lm1b wmt14 \
	wmt14-data synthetic-parallel-data gpu-check clean-venv

setup: $(STAMP)

# Re-runs only when the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

BENCH_OUT ?= bench
bench: $(STAMP)
	$(PY) -m eval.bench_moe --json $(BENCH_OUT)/bench_moe.json --markdown $(BENCH_OUT)/bench_moe.md

# Translation: MoE vs dense training tokens/s at equal ops/timestep, beam 1 and 4 sentences/s.
bench-translation: $(STAMP)
	$(PY) -m eval.bench_translation --json $(BENCH_OUT)/bench_translation.json \
		--markdown $(BENCH_OUT)/bench_translation.md

# Transformer LM training tokens/s: Switch-8, Switch-32 and top-2 against the dense preset.
bench-transformer: $(STAMP)
	$(PY) -m eval.bench_transformer --json $(BENCH_OUT)/bench_transformer.json \
		--markdown $(BENCH_OUT)/bench_transformer.md

# Expert parallelism at 1, 2 and 4 gloo ranks (on 2 cores: volume and correctness, not speed),
# then whole language models at 1 and 2 ranks: all-to-all bytes per token, top-1 against top-4.
bench-parallel: $(STAMP)
	$(PY) -m eval.bench_parallel --json $(BENCH_OUT)/bench_parallel.json \
		--markdown $(BENCH_OUT)/bench_parallel.md
	$(PY) -m eval.bench_parallel_model --json $(BENCH_OUT)/bench_parallel_model.json \
		--markdown $(BENCH_OUT)/bench_parallel_model.md

# --- gpu-check: on one CUDA GPU, in under 8 minutes: the CUDA tests (tests/cuda), a short bf16
# training of each backbone through lstm_moe.train, eval.bench_moe against the dense, loop and
# one-hot contenders at E = 8 ... 1024 and the grouped product against a dense GEMM, gathered in
# $(GPU_CHECK_OUT)/summary.md (eval/gpu_check.py). Without CUDA it stops at once with an error.
# On a machine whose own python3 has torch and no network for the venv: make gpu-check
# PY=python3 (any PY but the venv's skips building it; PYTHONPATH=. finds the packages), or
# directly: PYTHONPATH=. python3 -m eval.gpu_check
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))
	PYTHONPATH=. $(PY) -m eval.gpu_check --out $(GPU_CHECK_OUT)

# --- the demo: generated corpora -> dense and MoE models at equal ops/timestep -> one report ---
# TASK=lm or TASK=translation runs one part; both by default.
TASK ?= all
DEMO_DIR ?= runs/demo
DEMO_PARTS = $(if $(filter all,$(TASK)),lm translation,$(TASK))
# Each part also trains the MoE at the other k (the LSTM's k = 4 against Switch top-1, the
# Transformer's top-1 against the 2017 top-4), at the same active FLOPs, for the report's
# k=1 vs k=4 table.
DEMO_OTHER_K_lstm = k1
DEMO_OTHER_K_transformer = k4
DEMO_OTHER = moe-$(DEMO_OTHER_K_$(ARCH))
DEMO_RUNS_lm = $(DEMO_DIR)/dense $(DEMO_DIR)/moe $(DEMO_DIR)/$(DEMO_OTHER)
DEMO_RUNS_translation = $(DEMO_DIR)/nmt-dense $(DEMO_DIR)/nmt-moe $(DEMO_DIR)/nmt-$(DEMO_OTHER)
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(MAKE) --no-print-directory $(addprefix demo-,$(DEMO_PARTS))
	$(PY) -m eval.report $(foreach part,$(DEMO_PARTS),$(DEMO_RUNS_$(part))) --out $(DEMO_DIR) \
		--title "Generated corpora: dense vs MoE at equal ops/timestep"

# ARCH=lstm (default) trains the paper's LSTM models, ARCH=transformer the Transformers of
# switch/ (a dense one against Switch-32, top-1 at capacity factor 1.25), on the same data.
ARCH ?= lstm
# Language models: 4xLSTM-512 and MoE-32 scaled from width 512 to 64: four 64-cell LSTMs
# against two LSTMs around 32 experts of hidden width 128 (k = 4), so both spend ~0.13M ops
# per token (plus the same softmax), trained on the same 2M tokens. Transformers: 4 layers of
# width 64, a 256-wide FFN against 32 experts of width 256 in layers 1 and 3.
DEMO_TOKENS ?= 2000000
DEMO_COMMON = --softmax=full --dropout=0.0 --batch_size=32 --lr=0.003 --warmup_steps=100 \
	--max_tokens=$(DEMO_TOKENS) --eval_every=250 --eval_tokens=20000 --checkpoint_every=500 \
	--log_every=50
DEMO_TRAIN_lstm = --d_model=64 --lstm_hidden=64 --bptt=20 $(DEMO_COMMON)
DEMO_TRAIN_transformer = --d_model=64 --n_heads=2 --ffn_hidden=256 --bptt=32 $(DEMO_COMMON)
DEMO_PRESETS_lstm = 4xLSTM-512 MoE-32
DEMO_PRESETS_transformer = transformer-dense switch-32
DEMO_EXPERT_lstm = 128
DEMO_EXPERT_transformer = 256
# The other k: top-1 of experts four times as wide (capacity factor 1.25, 2.0 in evaluation),
# or top-4 of experts a quarter as wide (dropless).
SWITCH_K1 = --router=switch --k=1 --capacity_factor=1.25 --eval_capacity_factor=2.0
DEMO_OTHER_lstm = --preset MoE-32 --expert_hidden=512 $(SWITCH_K1)
DEMO_OTHER_transformer = --preset moe-top4-32 --expert_hidden=64
demo-lm: $(STAMP)
	data=$$($(PY) -m data_prep.synthetic --out data | tail -n 1); \
	$(TRAIN) --data $$data --run $(DEMO_DIR)/dense --preset $(word 1,$(DEMO_PRESETS_$(ARCH))) \
		$(DEMO_TRAIN_$(ARCH)); \
	$(TRAIN) --data $$data --run $(DEMO_DIR)/moe --preset $(word 2,$(DEMO_PRESETS_$(ARCH))) \
		$(DEMO_TRAIN_$(ARCH)) --expert_hidden=$(DEMO_EXPERT_$(ARCH)); \
	$(TRAIN) --data $$data --run $(DEMO_DIR)/$(DEMO_OTHER) $(DEMO_OTHER_$(ARCH)) \
		$(DEMO_TRAIN_$(ARCH))
	for run in $(DEMO_RUNS_lm); do $(PY) -m eval.perplexity $$run || exit 1; done

# Translation: the App. E model scaled from width 512 to 64 on the generated parallel corpus
# (reordering, topic-dependent word choice): NMT-dense with a 512-unit ReLU layer where the
# MoE was, against NMT-MoE-32 with 32 experts of width 128 (k = 4, the strictly balanced gate),
# the same ops per position, trained on the same target tokens, then beam search and BLEU.
DEMO_NMT_TOKENS ?= 1200000
DEMO_NMT_COMMON = --task translation --dropout=0.1 --batch_size=64 --lr=0.003 \
	--warmup_steps=100 --max_tokens=$(DEMO_NMT_TOKENS) --eval_every=250 --eval_pairs=500 \
	--checkpoint_every=500 --log_every=50
DEMO_NMT_TRAIN_lstm = --d_model=64 --lstm_hidden=64 --attention_hidden=64 $(DEMO_NMT_COMMON)
DEMO_NMT_TRAIN_transformer = --d_model=64 --n_heads=2 $(DEMO_NMT_COMMON)
DEMO_NMT_DENSE_lstm = --preset NMT-dense --ffn_hidden=512
DEMO_NMT_DENSE_transformer = --preset NMT-transformer-dense --ffn_hidden=256
DEMO_NMT_MOE_lstm = --preset NMT-MoE-32 --expert_hidden=128
DEMO_NMT_MOE_transformer = --preset NMT-switch-32 --ffn_hidden=256 --expert_hidden=256
DEMO_NMT_OTHER_lstm = --preset NMT-MoE-32 --expert_hidden=512 $(SWITCH_K1)
DEMO_NMT_OTHER_transformer = --preset NMT-moe-top4-32 --ffn_hidden=256 --expert_hidden=64
demo-translation: $(STAMP)
	data=$$($(PY) -m data_prep.synthetic_parallel --out data --preset demo | tail -n 1); \
	$(TRAIN) --data $$data --run $(DEMO_DIR)/nmt-dense $(DEMO_NMT_DENSE_$(ARCH)) \
		$(DEMO_NMT_TRAIN_$(ARCH)); \
	$(TRAIN) --data $$data --run $(DEMO_DIR)/nmt-moe $(DEMO_NMT_MOE_$(ARCH)) \
		$(DEMO_NMT_TRAIN_$(ARCH)); \
	$(TRAIN) --data $$data --run $(DEMO_DIR)/nmt-$(DEMO_OTHER) $(DEMO_NMT_OTHER_$(ARCH)) \
		$(DEMO_NMT_TRAIN_$(ARCH))
	for run in $(DEMO_RUNS_translation); do \
		$(PY) -m eval.perplexity $$run && $(TRANSLATE) $$run || exit 1; \
	done

# --- compare: dense, Switch top-1 (capacity factor 1.0 and 1.25), top-2, the 2017 noisy top-4
# and expert choice, at equal active FLOPs and training tokens, on LM and translation, LSTM and
# Transformer, with the experts axis E = 4, 32, 256 -> $(COMPARE_OUT)/report.md (eval/compare.py).
# TASK=lm|translation, ARCH=lstm|transformer, ROUTERS=dense,top1-cf1.25,top4, EXPERTS=4,32,256,
# SEEDS=1,2,3, BUDGET=time (equal training seconds instead of tokens), DATA=<prepared folder>
# (lm1b, WikiText-2, Multi30k, WMT'14: its task is read from its meta.json; or
# DATA=lm=DIR,translation=DIR), NPROC=2, DISTILL=1 (the dense model distilled from top-1, a row
# of its own, Switch §4.2); COMPARE_ARGS passes more (python -m eval.compare --help). A second
# `make compare` reuses the finished runs and resumes a killed one.
COMPARE_OUT ?= runs/compare
ROUTERS ?=
EXPERTS ?=
SEEDS ?=
BUDGET ?= tokens
DATA ?=
COMPARE_ARGS ?=
DISTILL ?=
# ARCH's default above is the demo's; the comparison takes both backbones unless ARCH is given.
, := ,
COMPARE_ARCHS = $(if $(filter file default,$(origin ARCH)),lstm$(,)transformer,$(ARCH))
compare: $(STAMP)
	$(PY) -m eval.compare --out $(COMPARE_OUT) --budget $(BUDGET) --nproc $(NPROC) \
		--archs $(COMPARE_ARCHS) $(if $(filter-out all,$(TASK)),--tasks $(TASK)) \
		$(if $(ROUTERS),--routers $(ROUTERS)) $(if $(EXPERTS),--experts $(EXPERTS)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(DATA),--data $(DATA)) \
		$(if $(filter 1,$(DISTILL)),--distill) $(COMPARE_ARGS)

# --- lm1b: prepare (download or LM1B_DIR) -> train PRESET -> test perplexity -----------------
# A second `make lm1b` with the same PRESET resumes the run where it stopped.
# ARCH=transformer: the Switch-32 Transformer by default (PRESET=transformer-dense, switch-8,
# moe-top2-32, moe-top4-32: python -m lstm_moe.presets).
PRESET ?= $(if $(filter transformer,$(ARCH)),switch-32,MoE-32)
LM1B_DIR ?=
MAX_TOKENS ?= 100000000
LM1B_RUN ?= runs/lm1b-$(PRESET)
TRAIN_ARGS ?=
lm1b: $(STAMP)
	data=$$($(PY) -m data_prep.lm1b --out data $(if $(LM1B_DIR),--source $(LM1B_DIR)) | tail -n 1); \
	if [ -f $(LM1B_RUN)/checkpoint.pt ]; then \
		$(TRAIN) --run $(LM1B_RUN) --resume --max_tokens=$(MAX_TOKENS) $(TRAIN_ARGS); \
	else \
		$(TRAIN) --data $$data --run $(LM1B_RUN) --preset $(PRESET) \
			--max_tokens=$(MAX_TOKENS) $(TRAIN_ARGS); \
	fi
	$(PY) -m eval.perplexity $(LM1B_RUN)

# --- WMT'14 (§5.3): prepare En-De or En-Fr (download, or WMT14_DIR: the archives or their trees)
# -> train PRESET (NMT-MoE-32 by default: PRESET=MoE-2048-h and PRESET=NMT-MoE-2048-h both name
# the 2048-expert model) -> test perplexity -> beam search on newstest2014 -> BLEU. A second
# `make wmt14` with the same PAIR and PRESET resumes the run where it stopped.
PAIR ?= en-de
WMT14_DIR ?=
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
NMT_PRESET = $(if $(filter NMT-%,$(PRESET)),$(PRESET),NMT-$(PRESET))
WMT14_RUN ?= runs/wmt14-$(PAIR)-$(NMT_PRESET)
WMT14_PREPARE = $(PY) -m data_prep.wmt14 --out data --pair $(PAIR) \
	$(if $(WMT14_DIR),--source $(WMT14_DIR)) --workers $(WORKERS)
# Prints the prepared folder, data/wmt14-en-<xx>-<recipe id>; a second run finds it at once.
wmt14-data: $(STAMP)
	$(WMT14_PREPARE) | tail -n 1
wmt14: $(STAMP)
	data=$$($(WMT14_PREPARE) | tail -n 1); \
	if [ -f $(WMT14_RUN)/checkpoint.pt ]; then \
		$(TRAIN) --run $(WMT14_RUN) --resume --max_tokens=$(MAX_TOKENS) $(TRAIN_ARGS); \
	else \
		$(TRAIN) --task translation --data $$data --run $(WMT14_RUN) --preset $(NMT_PRESET) \
			--max_tokens=$(MAX_TOKENS) $(TRAIN_ARGS); \
	fi
	$(PY) -m eval.perplexity $(WMT14_RUN)
	$(TRANSLATE) $(WMT14_RUN)

# The generated parallel corpus (reordering, topic-dependent words; data_prep/synthetic_parallel.py)
# for translation demos: prints its folder, data/synthetic-parallel-src-tgt-<recipe id>.
synthetic-parallel-data: $(STAMP)
	$(PY) -m data_prep.synthetic_parallel --out data --preset demo | tail -n 1

clean-venv:
	rm -rf $(VENV)
