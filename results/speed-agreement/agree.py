"""Per stage: how many test pairs two runs of the same experiment get right or wrong alike, their accuracies,
the largest margin difference and the stage times. python results/speed-agreement/agree.py BEFORE AFTER"""
import json, sys, glob
from pathlib import Path
a, b = [Path(glob.glob(f"{d}/rm-*")[0]) for d in sys.argv[1:3]]  # two folders, each holding one rm-* run
for st in ("weak", "strong", "student-none", "student-explicit"):
    if not (a / st / "stage.json").exists() or not (b / st / "stage.json").exists():
        continue
    pa = [json.loads(l) for l in open(a / st / "predictions.jsonl")]
    pb = [json.loads(l) for l in open(b / st / "predictions.jsonl")]
    agree = sum(x["correct"] == y["correct"] for x, y in zip(pa, pb)) / len(pa)
    sa, sb = (json.load(open(d / st / "stage.json")) for d in (a, b))
    md = max(abs(x["margin"] - y["margin"]) for x, y in zip(pa, pb)); mm = max(abs(x["margin"]) for x in pa)
    print(f"{st}: agreement {agree:.3f} ({sum(x['correct'] != y['correct'] for x, y in zip(pa, pb))} of {len(pa)} differ), accuracy {sa['accuracy']:.3f} -> {sb['accuracy']:.3f}, max |Δmargin| {md:.4f} (max |margin| {mm:.4f}), seconds {sa['seconds']:.0f} -> {sb['seconds']:.0f}")
    if (a / st / "labels.jsonl").exists():
        la = [json.loads(l) for l in open(a / st / "labels.jsonl")]; lb = [json.loads(l) for l in open(b / st / "labels.jsonl")]
        k = [k for k in la[0] if k != "index"]
        print("  labels keys", k, "max |Δ|", max(abs(x[k[0]] - y[k[0]]) for x, y in zip(la, lb)))
