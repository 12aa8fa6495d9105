#!/usr/bin/env bash
# The arithmetic ladder (issue 46): SimPO, weak SmolLM2-135M-Instruct, strong rungs Qwen2.5-Coder-0.5B-Instruct and
# its first 22 / 21 layers, at the calibrated rate (1e-6, results/arith-calibration). docs/arith.md gives the
# choices (method, sizes, seeds) and their measurements; docs/power.md the power calculation.
#
#   results/arith-ladder/ladder.sh STRONG SEED [SEED ...]    e.g. ladder.sh models/qwen2.5-coder-0.5b-instruct 0 1
#   results/arith-ladder/ladder.sh --through MIDDLE STRONG SEED [SEED ...]
#
# --through: bootstrapping, weak -> MIDDLE -> STRONG: MIDDLE learns the weak labels and labels the students' pairs;
# per seed the none and explicit (alpha 0.5) students, the same seeds as the widest rung (the weak and strong
# ceilings are reused from that rung's run folders, so a seed costs 3 Qwen-sized stages).
#
# Per seed, in this order (each a command a reader can type; finished stages are reused from the folder):
#   none + explicit (alpha 0.5), explicit (alpha 0.2); on seed 0 also a churn student (no conflict, data order
#   seed 100), one per rung as issue 46 asks; on the widest rung (the full Qwen) and seed 0 also explicit at alpha
#   0.05, the dose-response's third dose (python tools/dose.py results/arith-ladder reads them against the churn).
# Every rung trains on 500 ground-truth and 500 weak-labelled pairs, not the calibrated 1000: a Qwen stage then
# takes 21 to 23 min here instead of about 34, on one thread; 4000 test pairs: the power plan (docs/arith.md).
# Run from the repository root.
set -eu
usage="usage: ladder.sh [--through MIDDLE] STRONG SEED [SEED ...]"
middle=""
if [ "${1:-}" = --through ]; then middle=${2:?$usage}; shift 2; fi
strong=${1:?$usage}; shift
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
common=(--data arith --weak models/smollm2-135m-instruct --strong "$strong" --n_gt 500 --n_w2s 500 --n_test 4000
        --lr 1e-6 --precision bf16 --compile off --out_dir results/arith-ladder)
if [ -n "$middle" ]; then
  for seed in "$@"; do
    python simpo_w2s.py "${common[@]}" --intermediate "$middle" --seed "$seed" --settings none,explicit --alpha 0.5
  done
  exit 0
fi
for seed in "$@"; do
  python simpo_w2s.py "${common[@]}" --seed "$seed" --settings none,explicit --alpha 0.5
  python simpo_w2s.py "${common[@]}" --seed "$seed" --settings none,explicit --alpha 0.2
  if [ "$seed" = 0 ]; then
    python simpo_w2s.py "${common[@]}" --seed 0 --settings none --student_seed 100
    if [ "$strong" = models/qwen2.5-coder-0.5b-instruct ]; then
      python simpo_w2s.py "${common[@]}" --seed 0 --settings explicit --alpha 0.05
    fi
  fi
done
