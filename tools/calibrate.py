"""The ceilings' learning rate, chosen on a validation split that the test split never sees.

A reward-model ceiling is trained on the first 3500 pairs of the paper's gt file (one epoch, the run's batch)
and scored on the file's last 500 (the validation split); the w2s split is labelled only on its first 32 pairs
(the stage wants some). The validation margins say how well the ceiling ranks and how informative its labels
would be: p = sigmoid(margin), mean |p - 0.5| and the share of p further than 0.1 from 0.5.

  OMP_NUM_THREADS=1 python tools/calibrate.py --weak models/smollm2-135m-instruct:first8 --lr 1e-4   # one stage
  python tools/calibrate.py --summarize results/calibration                                          # the table

Every other option is rm_w2s.py's. Nothing here runs at import time.
"""
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and the method scripts: one folder up

import common
import rm_w2s
import runs

N_TRAIN, N_VAL = 3500, 500


def calibration_data(source, folder):
    """The paper's layout in `folder`: harmless_train_gt = the first N_TRAIN lines of source's gt file,
    harmless_test = its last N_VAL (the validation split), harmless_train_w2s = source's w2s file."""
    gt = [line for line in (Path(source) / "harmless_train_gt.jsonl").read_text().splitlines() if line.strip()]
    if len(gt) < N_TRAIN + N_VAL:
        raise SystemExit(f"error: {source}/harmless_train_gt.jsonl has {len(gt)} pairs; calibration needs "
                         f"{N_TRAIN + N_VAL}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "harmless_train_gt.jsonl").write_text("\n".join(gt[:N_TRAIN]) + "\n")
    (folder / "harmless_test.jsonl").write_text("\n".join(gt[-N_VAL:]) + "\n")
    (folder / "harmless_train_w2s.jsonl").write_text((Path(source) / "harmless_train_w2s.jsonl").read_text())
    return folder


def informativeness(margins):
    """Accuracy with its interval, and what labels p = sigmoid(margin) would carry (common.label_informativeness)."""
    k, n = sum(m > 0 for m in margins), len(margins)
    return {"accuracy": k / n, "n": n, "ci": common.wilson(k, n), **common.label_informativeness(margins)}


def calibrate(argv):
    args = runs.parse_args(rm_w2s.Args, ["--n_gt", str(N_TRAIN), "--n_test", str(N_VAL), "--n_w2s", "32",
                                         "--n_extra", "0", "--settings", "none", "--out_dir", "results/calibration",
                                         "--data", "../shared/data/hh-single-turn", *argv])
    data = calibration_data(args.data, Path("runs") / "calibration-data")
    args = dataclasses.replace(args, data=str(data), strong=args.weak)
    runs.check_args(args)
    args = dataclasses.replace(args, precision=common.resolve_precision(args.precision))
    run = runs.start_run(args, rm_w2s.METHOD, code_files=[rm_w2s.__file__, common.__file__])
    gt, w2s, val = run.splits["gt"], run.splits["w2s"], run.splits["test"]
    targets = [1.0] * len(gt)
    key = runs.stage_key(run, "weak", args.max_len, gt, targets, val, w2s)
    stage = runs.load_stage(run, "weak", key) or runs.save_stage(run, "weak", key, *rm_w2s.train_and_predict(
        run.root / "weak", run.models["weak"], args.max_len, gt, targets, val, w2s, args=args))
    print(json.dumps({"model": args.weak, "lr": args.lr, **informativeness(
        [row["margin"] for row in runs.read_predictions(stage)])}))


def summary(folder):
    """The calibration table: one row per finished calibration stage under `folder`, from its committed files."""
    rows = []
    for stage_json in sorted(Path(folder).glob("*/weak/stage.json")):
        stage = runs.read_stage(stage_json.parent)  # None for a damaged stage: it is left out, never read
        if stage is None:
            continue
        config = json.loads((stage_json.parent.parent / "config.json").read_text())
        m = informativeness([row["margin"] for row in common.read_jsonl(stage_json.parent / "predictions.jsonl")])
        rows.append((config["weak"], config["lr"], m, stage.get("seconds")))
    lines = [f"`python tools/calibrate.py --summarize {folder}`: reward-model ceilings trained on {N_TRAIN} gt pairs "
             f"(one epoch), scored on the gt file's last {N_VAL} (validation); p = sigmoid(margin).", "",
             "| model | lr | validation accuracy [95% CI] | mean \\|margin\\| | mean \\|p − 0.5\\| | share of p beyond 0.1 "
             "| wall time |", "|---|---|---|---|---|---|---|"]
    for model, lr, m, seconds in sorted(rows, key=lambda r: (r[0], r[1])):
        lines.append(f"| {model} | {lr:g} | {m['accuracy']:.3f} [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}] | "
                     f"{m['mean_abs_margin']:.3f} | {m['mean_abs_p']:.3f} | {m['share_beyond_0.1']:.3f} | "
                     f"{seconds / 60:.0f} min |")
    return "\n".join(lines) + "\n"


def summarize(folder):
    """calibration.md in `folder` (summary), printed too."""
    text = summary(folder)
    runs.write_atomic(Path(folder) / "calibration.md", text)
    print(text, end="")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summarize"]:
        summarize(sys.argv[2])
    else:
        calibrate(sys.argv[1:])
