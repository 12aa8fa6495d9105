"""The ceilings' learning rate, chosen on a validation split that the test split never sees.

A reward-model ceiling is trained on the first --n_gt pairs of the paper's gt file (default 3500; one epoch, the
run's batch) and scored on the file's last --n_test (default 500: the validation split); the w2s split is
labelled only on its first 32 pairs (the stage wants some). The validation margins say how well the ceiling
ranks and how informative its labels would be: p = sigmoid(margin), mean |p - 0.5| and the share of p further
than 0.1 from 0.5. The split files go to runs/calibration-data/<source>-<hash> (one folder per gt file and
sizes); each run's config.json records its source under "calibration".

  OMP_NUM_THREADS=1 python tools/calibrate.py --weak models/smollm2-135m-instruct:first8 --lr 1e-4   # one stage
  python tools/calibrate.py --summarize results/calibration                                          # the table

Every other option is rm_w2s.py's. Nothing here runs at import time.
"""
import dataclasses
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and the method scripts: one folder up

import common
import rm_w2s
import runs
from tools import sweep

N_TRAIN, N_VAL = 3500, 500  # the defaults of --n_gt and --n_test
USAGE = "usage: python tools/calibrate.py --summarize FOLDER   (the table of the calibration runs in FOLDER)"


def jsonl_lines(path):
    """The non-blank lines of a jsonl file, split at "\\n" only, as common.iter_jsonl reads them: a text may hold
    U+2028 (valid JSON, written raw by json.dumps(ensure_ascii=False)), where str.splitlines() would split."""
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (calibration reads the paper's gt and w2s files)")
    return [line for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]


def calibration_data(source, n_train, n_val, root=Path("runs") / "calibration-data"):
    """The paper's layout in a folder of its own under `root` (one per source and sizes, so that two gt files
    never share a run folder): harmless_train_gt = the first n_train lines of source's gt file, harmless_test =
    its last n_val (the validation split), harmless_train_w2s = source's w2s file."""
    source = Path(source)
    if not source.is_dir():  # hh, cai, toy: calibration cuts its splits from the paper's files
        raise SystemExit(f"error: --data {source}: calibration reads a folder with the paper's harmless_train_gt.jsonl "
                         "and harmless_train_w2s.jsonl")
    gt = jsonl_lines(source / "harmless_train_gt.jsonl")
    if len(gt) < n_train + n_val:
        raise SystemExit(f"error: {source}/harmless_train_gt.jsonl has {len(gt)} pairs; calibration on --n_gt "
                         f"{n_train} and --n_test {n_val} needs {n_train + n_val}")
    w2s = jsonl_lines(source / "harmless_train_w2s.jsonl")
    folder = root / f"{runs.slug(source.resolve().name)}-{runs.digest(source.resolve(), n_train, n_val)[:8]}"
    for name, lines in (("harmless_train_gt", gt[:n_train]), ("harmless_test", gt[-n_val:]),
                        ("harmless_train_w2s", w2s)):
        runs.write_atomic(folder / f"{name}.jsonl", "\n".join(lines) + "\n")  # whole: another calibration may read it
    return folder


def informativeness(margins):
    """Accuracy with its interval, and what labels p = sigmoid(margin) would carry (common.label_informativeness)."""
    k, n = sum(m > 0 for m in margins), len(margins)
    return {"accuracy": k / n, "n": n, "ci": common.wilson(k, n), **common.label_informativeness(margins)}


def calibrate(argv):
    """One calibration stage: the weak model trained on the gt file's first --n_gt pairs, scored on its last
    --n_test; prints its validation numbers as one JSON line."""
    if "--help" in argv or "-h" in argv:
        print(__doc__)
    args = runs.parse_args(rm_w2s.Args, ["--n_gt", str(N_TRAIN), "--n_test", str(N_VAL), "--n_w2s", "32",
                                         "--n_extra", "0", "--settings", "none", "--out_dir", "results/calibration",
                                         "--data", "../shared/data/hh-single-turn", *argv])
    args = dataclasses.replace(args, strong=args.weak)
    runs.check_args(args)  # before the split files are written
    source = args.data
    args = dataclasses.replace(args, data=str(calibration_data(source, args.n_gt, args.n_test)),
                               precision=common.resolve_precision(args.precision))
    run = runs.start_run(args, rm_w2s.METHOD, code_files=[rm_w2s.__file__, common.__file__])
    # the run's options say which split files it read; what they were cut from, only this says
    runs.write_json(run.root / "config.json", {**dataclasses.asdict(args), "calibration": {
        "source": source, "gt_first": args.n_gt, "validation_last": args.n_test}})
    stage = rm_w2s.stage(run, "weak", run.splits["gt"], [1.0] * len(run.splits["gt"]), run.splits["w2s"])
    print(json.dumps({"model": args.weak, "lr": args.lr, "data": source, **informativeness(
        [row["margin"] for row in runs.read_predictions(stage)])}))


def is_calibration(config):
    """A run calibrate.py made: its config records the source, or (made before it did) it trained the weak model
    as its own strong one and no student but `none`, which no experiment does."""
    return "calibration" in config or (config.get("weak") == config.get("strong") and config.get("settings") == "none")


def calibration_rows(folder):
    """(one row per finished calibration stage under `folder`, [(run folder, why it is not a row)])."""
    rows, left_out = [], []
    for config_path in sorted(Path(folder).glob("*/config.json")):
        run = config_path.parent
        config = sweep.read_json(config_path)
        if not (isinstance(config, dict) and sweep.is_run_config(config_path)):
            left_out.append((run, "its config.json does not read as a run's options"))
        elif not is_calibration(config):
            left_out.append((run, "not a calibration run (an experiment's run folder)"))
        elif (stage := runs.read_stage(run / "weak")) is None:  # damaged or unfinished: never read
            left_out.append((run, "its weak/ stage is unfinished or damaged"))
        else:
            m = informativeness([row["margin"] for row in common.read_jsonl(run / "weak" / "predictions.jsonl")])
            rows.append({"model": config["weak"], "lr": config["lr"], "n_train": stage.get("n_train"), "n_val": m["n"],
                         "data": (config.get("calibration") or {}).get("source", "(not recorded)"), "m": m,
                         "seconds": stage.get("seconds")})
    return sorted(rows, key=lambda r: (r["data"], r["model"], r["lr"], r["n_train"] or 0, r["n_val"])), left_out


def summary(folder):
    """The calibration table from the runs' own files: the sizes and data source each run recorded (a column
    where they differ between rows, else said once), and the calibration runs left out, with why."""
    rows, left_out = calibration_rows(folder)
    sizes = {(r["n_train"], r["n_val"]) for r in rows}
    trained = (f"trained on the first {next(iter(sizes))[0]} pairs of the gt file (one epoch), scored on its last "
               f"{next(iter(sizes))[1]} (validation)" if len(sizes) == 1 else
               "trained on the gt file's first train pairs (one epoch), scored on its last validation pairs")
    columns = ["model", "lr"] + ["data"] * (len({r["data"] for r in rows}) > 1) + \
        ["train pairs", "validation pairs"] * (len(sizes) > 1)
    short = sweep.short_models(r["model"] for r in rows)
    cells = []
    for r in rows:
        m = r["m"]
        values = {"model": short.get(r["model"], r["model"]), "lr": f"{r['lr']:g}", "data": r["data"],
                  "train pairs": r["n_train"], "validation pairs": r["n_val"]}
        cells.append([values[c] for c in columns] + [
            f"{m['accuracy']:.3f} [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}]", f"{m['mean_abs_margin']:.3f}",
            f"{m['mean_abs_p']:.3f}", f"{m['share_beyond_0.1']:.3f}",
            f"{r['seconds'] / 60:.0f} min" if r["seconds"] is not None else "–"])
    note = sweep.models_note(short)
    lines = [f"`python tools/calibrate.py --summarize {folder}`: reward-model ceilings {trained}; p = sigmoid(margin).",
             "", *([note, ""] if note else []),
             *sweep.table(columns + ["validation accuracy [95% CI]", "mean \\|margin\\|", "mean \\|p − 0.5\\|",
                                     "share of p beyond 0.1", "wall time"], cells)]
    if left_out:
        lines += ["", "Left out:", "", *(f"- `{run.name}`: {why}" for run, why in left_out)]
    return "\n".join(lines) + "\n"


def summarize(folder):
    """calibration.md in `folder` (summary), printed too. It reads: a folder that is not there, or holds no
    finished calibration run, is one line, and a calibration.md it did not write is never overwritten."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder")
    rows, left_out = calibration_rows(folder)
    if not rows:
        raise SystemExit(f"error: {folder} holds no finished calibration run"
                         + (f" ({len(left_out)} run folders left out, e.g. {left_out[0][0].name}: {left_out[0][1]})"
                            if left_out else " (no run folders)"))
    md = folder / "calibration.md"
    if md.exists() and not re.match(r"`python (tools/)?calibrate\.py --summarize ", md.read_text(errors="replace")):
        raise SystemExit(f"error: {md} was not written by calibrate.py --summarize; move it away first")
    text = summary(folder)
    runs.write_atomic(md, text)
    print(text, end="")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--summarize"]:
        if len(argv) != 2 or argv[1].startswith("-"):
            raise SystemExit(USAGE)
        summarize(argv[1])
    else:
        calibrate(argv)


if __name__ == "__main__":
    main()
