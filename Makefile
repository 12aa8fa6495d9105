# Usage: make rm STRONG=gpt2-xl WEAK=gpt2 [ARGS="--settings none,explicit"]
PY ?= python
STRONG ?= gpt2-medium
WEAK ?= gpt2
ARGS ?=
# Pairs per forward pass (gradients accumulate up to the batch of 32): 4 for large / xl models, so that
# gpt2-xl fits one 80 GB GPU, 8 otherwise.
MICRO ?= $(if $(filter %large %xl %-1.3b %-2.7b %-6.7b,$(STRONG)),4,8)

.PHONY: install test rm dpo simpo
install:
	$(PY) -m pip install -q -r requirements.txt

test: install
	$(PY) -m pytest -q

rm:
	$(PY) rm_w2s.py --strong $(STRONG) --weak $(WEAK) --micro_batch $(MICRO) $(ARGS)

dpo:
	$(PY) dpo_w2s.py --strong $(STRONG) --weak $(WEAK) --micro_batch $(MICRO) $(ARGS)

simpo:
	$(PY) simpo_w2s.py --strong $(STRONG) --weak $(WEAK) --micro_batch $(MICRO) $(ARGS)
