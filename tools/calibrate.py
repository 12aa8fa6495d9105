"""The ceilings' learning rate, chosen on a validation split that the test split never sees.

A ceiling of --method rm (default), dpo or simpo is trained on ground truth by that script's own stage() and scored
on a validation split; every option but --method and --zero_shot is that script's (its Args):

- a folder of the paper's HH files (--data, default ../shared/data/hh-single-turn): trained on the first --n_gt pairs
  of its gt file (default 3500), scored on the file's last --n_test (default 500). The split files go to
  runs/calibration-data/<source>-<hash> (one folder per gt file and sizes).
- --data arith: trained on the arithmetic testbed's gt split (--n_gt, default the paper's 4000: the gt split an arith
  run of that size trains on), scored on its own validation split (--n_test, default all 2000 pairs), which no run
  tests on: the run is `--data arith:val` (arith.py). The table gives the accuracy per tier too.

The w2s split is labelled only on its first 32 pairs (the stage wants some). The validation margins say how well the
ceiling ranks and how informative its labels would be: p = sigmoid(margin), as labels.jsonl records it, mean
|p - 0.5| and the share of p further than 0.1 from 0.5. The margin is the reward margin (rm), the summed response
log-likelihood ratio log π(chosen) - log π(rejected) (dpo), or that ratio's mean per response token (simpo); DPO and
SimPO students learn the hard label 1[margin > 0], and --conf_threshold reads sigmoid(|margin| / conf_scale) (DPO's
conf_scale is 50, as in the paper's code). --zero_shot (dpo, simpo) trains nothing: the untrained policy (no SFT)
scores the validation split by the method's margin rule, in a stage of its own (zero-shot/): what its likelihood
knows before training. Each run's config.json records its method, source and sizes under "calibration".

  OMP_NUM_THREADS=1 python tools/calibrate.py --weak models/smollm2-135m-instruct:first8 --lr 1e-4   # one stage
  OMP_NUM_THREADS=1 python tools/calibrate.py --data arith --method dpo --weak models/qwen2.5-coder-0.5b-instruct \\
      --lr 1e-6 --out_dir results/arith-calibration
  OMP_NUM_THREADS=1 python tools/calibrate.py --data arith --method simpo --zero_shot \\
      --weak models/qwen2.5-coder-0.5b-instruct --out_dir results/arith-calibration
  python tools/calibrate.py --summarize results/calibration                                          # the table

Nothing here runs at import time.
"""
import dataclasses
import importlib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and the method scripts: one folder up

import arith
import common
import runs
from tools import sweep

N_TRAIN, N_VAL = 3500, 500  # the paper's HH files: the defaults of --n_gt and --n_test
ARITH_TRAIN, ARITH_VAL = 4000, arith.VAL_PER_TIER * len(arith.TIERS)  # --data arith: the paper's 4000, all 2000
METHODS = {"rm": "reward-model", "dpo": "DPO", "simpo": "SimPO"}  # --method: its name in the table's first line
MARGINS = {"rm": "the reward margin", "dpo": "the summed response log-likelihood ratio log π(c) − log π(r)",
           "simpo": "the mean per-token response log-likelihood ratio"}
STAGES = ("weak", "zero-shot")  # a calibration run's stages: the trained ceiling, the untrained policy
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
                         "and harmless_train_w2s.jsonl, or arith (its own validation split)")
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


def own_options(argv):
    """(--method, --zero_shot, the other options: the method script's). A wrong one is one line."""
    method, zero_shot, rest, i = "rm", False, [], 0
    while i < len(argv):
        key, eq, value = argv[i].partition("=")
        if key == "--method":
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit("error: --method needs a value: rm, dpo or simpo")
                i, value = i + 1, argv[i + 1]
            method = value
        elif argv[i] == "--zero_shot":
            zero_shot = True
        else:
            rest.append(argv[i])
        i += 1
    if method not in METHODS:
        raise SystemExit(f"error: --method takes rm, dpo or simpo, got {method!r}")
    if zero_shot and method == "rm":
        raise SystemExit("error: --zero_shot scores the policy's own likelihood (--method dpo or simpo); an untrained "
                         "reward model's head is zero, so every margin is 0")
    return method, zero_shot, rest


def zero_shot_scores(run, script):
    """The untrained policy's margins on the validation split by the method's own rule (script.margins_of: DPO's
    summed response log-likelihood ratio, SimPO's mean per token); no SFT, no training. Returns (summary, {file:
    rows}), as a stage's train_and_predict does."""
    args, test = run.args, run.splits["test"]
    model, tok = script.load(run.models["weak"], args, common.device())
    model.eval()
    max_len = min(args.max_len, common.model_max_len(model.config) or args.max_len)
    margins = script.margins_of(model, script.encode(tok, test, max_len), tok.pad_token_id, args.micro_batch,
                                common.autocast(args.precision))
    summary = {**common.accuracy(margins), "n_train": 0, "cut": {"test": common.n_cut(tok, test, max_len, eos=True)}}
    return summary, {"predictions.jsonl": common.prediction_rows(margins)}


def zero_shot_stage(run, script):
    """The stage zero-shot/ under a visible cache guard. Its key holds what it reads alone (the method, the model,
    max_len, the validation pairs, precision, compile and the code), none of the training options: it never
    matches a trained stage's, and a run at another learning rate finds it in its sibling's folder."""
    args = run.args
    key = runs.digest("zero-shot", script.METHOD, run.model_digests["weak"], args.max_len,
                      runs.pairs_digest(run.splits["test"]), args.precision, args.compile,
                      json.dumps(run.code, sort_keys=True))
    return runs.load_stage(run, "zero-shot", key) or runs.save_stage(run, "zero-shot", key,
                                                                     *zero_shot_scores(run, script))


def calibrate(argv):
    """One calibration stage: the weak model trained by --method's stage() on the gt pairs (--zero_shot: not
    trained), scored on the validation split; prints its row of the table as one JSON line."""
    if "--help" in argv or "-h" in argv:
        print(__doc__)
    method, zero_shot, argv = own_options(argv)
    script = importlib.import_module(f"{method}_w2s")
    fixed = ["--n_w2s", "32", "--n_extra", "0", "--settings", "none", "--out_dir", "results/calibration",
             "--data", "../shared/data/hh-single-turn"]
    is_arith = runs.parse_args(script.Args, fixed + argv).data in ("arith", "arith:val")
    n_train, n_val = (ARITH_TRAIN, ARITH_VAL) if is_arith else (N_TRAIN, N_VAL)
    args = runs.parse_args(script.Args, ["--n_gt", str(n_train), "--n_test", str(n_val), *fixed, *argv])
    args = dataclasses.replace(args, strong=args.weak)
    runs.check_args(args)  # before the split files are written
    if is_arith:  # the testbed's own validation split as the test split, the same gt split as --data arith
        source, data = "arith", "arith:val"
        record = {"source": source, "gt_split": args.n_gt, "validation_split": args.n_test}
    else:
        source, data = args.data, str(calibration_data(args.data, args.n_gt, args.n_test))
        record = {"source": source, "gt_first": args.n_gt, "validation_last": args.n_test}
    args = dataclasses.replace(args, data=data, precision=common.resolve_precision(args.precision))
    run = runs.start_run(args, script.METHOD, code_files=[script.__file__, common.__file__])
    # the run's options say which split files it read; what they were cut from, and by which method, only this says
    config = {**dataclasses.asdict(args), "calibration": {"method": method, **record}}
    runs.write_json(run.root / "config.json", config)
    if zero_shot:
        stage = zero_shot_stage(run, script)
    else:
        stage = script.stage(run, "weak", run.splits["gt"], [1.0] * len(run.splits["gt"]), run.splits["w2s"])
    print(json.dumps(calibration_row(run.root, config, Path(stage["dir"]).name, stage)))


def is_calibration(config):
    """A run calibrate.py made: its config records the source, or (made before it did) it trained the weak model
    as its own strong one and no student but `none`, which no experiment does."""
    return "calibration" in config or (config.get("weak") == config.get("strong") and config.get("settings") == "none")


def tier_accuracy(config, predictions):
    """{tier: [right, pairs]} of an arith run's validation predictions (arith.tiers_of_test_split), else None."""
    tiers = arith.tiers_of_run(config)
    if tiers is None:
        return None
    counts = {tier: [0, 0] for tier in arith.TIERS}
    for row in predictions:
        counts[tiers[row["index"]]][0] += row["margin"] > 0
        counts[tiers[row["index"]]][1] += 1
    return counts


def calibration_row(run, config, name, stage):
    """One row of the table: a finished stage `name` (weak: trained; zero-shot: not) of the run folder `run`."""
    predictions = common.read_jsonl(run / name / "predictions.jsonl")
    calibration = config.get("calibration") or {}
    m = informativeness([row["margin"] for row in predictions])
    return {"method": calibration.get("method", "rm"),  # runs made before it was recorded: all reward models
            "model": config["weak"], "lr": None if name == "zero-shot" else config["lr"],
            "head_lr": config.get("head_lr") or None,  # rm --head_lr: the head's own rate (runs before it: none)
            "data": calibration.get("source", "(not recorded)"), "n_train": stage.get("n_train"), "n_val": m.pop("n"),
            **m, "tiers": tier_accuracy(config, predictions), "seconds": stage.get("seconds"),
            "epochs": config.get("epochs", 1), "sft_epochs": config.get("sft_epochs")}  # rm: no SFT


def calibration_rows(folder):
    """(one row per finished calibration stage under `folder`, [(run folder, why it is not a row)]). A zero-shot
    stage copied into another run folder (its key says so) is one row."""
    rows, left_out, zero_shot_keys = [], [], set()
    for config_path in sorted(Path(folder).glob("*/config.json")):
        run = config_path.parent
        config = sweep.read_json(config_path)
        if not (isinstance(config, dict) and sweep.is_run_config(config_path)):
            left_out.append((run, "its config.json does not read as a run's options"))
            continue
        if not is_calibration(config):
            left_out.append((run, "not a calibration run (an experiment's run folder)"))
            continue
        for name in [name for name in STAGES if (run / name).is_dir()] or ["weak"]:
            stage = runs.read_stage(run / name)
            if stage is None:  # damaged or unfinished: never read
                left_out.append((run, f"its {name}/ stage is unfinished or damaged"))
            elif name == "weak" or stage.get("key") not in zero_shot_keys:
                rows.append(calibration_row(run, config, name, stage))
                if name == "zero-shot":
                    zero_shot_keys.add(stage.get("key"))
    order = list(METHODS)
    return sorted(rows, key=lambda r: (order.index(r["method"]) if r["method"] in order else len(order), r["data"],
                                       r["model"], r["lr"] is not None, r["lr"] or 0, r["head_lr"] or 0, r["n_train"] or 0,
                                       r["n_val"])), left_out


def epochs_text(trained):
    """" (one epoch)", " (SFT 1 epoch, then 3 epochs)", or per method where methods differ: what the trained rows'
    configs give."""
    by_method = {}
    for r in trained:
        by_method.setdefault(r["method"], set()).add((r["epochs"], r["sft_epochs"]))
    if not trained or any(len(both) > 1 for both in by_method.values()):
        return " (the epochs each run's config.json gives)" if trained else ""
    texts = {}
    for method, [(e, sft)] in by_method.items():
        times = "one epoch" if e == 1 else f"{e} epochs"
        if sft is not None:  # DPO and SimPO: SFT first
            times = ("no SFT" if sft == 0 else f"SFT {sft} epoch" + "s" * (sft != 1)) + f", then {times}"
        texts[method] = times
    return " (" + "; ".join(t if len(texts) == 1 else f"{m}: {t}" for m, t in texts.items()) + ")"


def described(rows, show_sizes):
    """The table's first words: which ceilings, what they trained on and were scored on, and what p means."""
    if not rows:  # every run left out (summarize refuses such a folder; summary says so)
        return "no finished calibration run."
    methods = [m for m in METHODS if m in {r["method"] for r in rows}]
    trained = [r for r in rows if r["lr"] is not None]
    train, val = (trained or rows)[0]["n_train"], rows[0]["n_val"]
    epochs = epochs_text(trained)
    sources = {"arith" if r["data"] == "arith" else "file" for r in rows}
    if not trained:  # zero-shot rows alone
        where = ("scored on arith's validation split" if sources == {"arith"} else
                 "scored on the gt file's last pairs (validation)" if sources == {"file"} else
                 "scored on each source's validation pairs") + ("" if show_sizes else f", {val} pairs")
    elif sources == {"file"}:
        where = (f"trained on the first {train} pairs of the gt file{epochs}, scored on its last {val} (validation)"
                 if not show_sizes else
                 f"trained on the gt file's first train pairs{epochs}, scored on its last validation pairs")
    elif sources == {"arith"}:
        where = (f"trained on arith's gt split of {train} pairs{epochs}, scored on {val} pairs of its validation "
                 "split, which no run tests on" if not show_sizes else
                 f"trained on arith's gt split{epochs}, scored on its validation split, which no run tests on")
    else:
        where = (f"trained on each source's gt pairs{epochs}, scored on its validation pairs (a folder: the gt file's "
                 "first and last pairs; arith: its gt and validation splits)")
    what = "ceilings" if trained else "policies, untrained,"
    if len(methods) == 1:
        what = f"{METHODS[methods[0]]} {what}"
    p = "p = sigmoid(margin)"
    if methods != ["rm"]:
        p += (", as labels.jsonl records it; the margin is " + ", ".join(f"{MARGINS[m]} ({m})" for m in methods)
              + "; DPO and SimPO students learn the hard label 1[margin > 0], and --conf_threshold reads "
              "sigmoid(|margin| / conf_scale) (DPO's conf_scale: 50, as the paper's code)")
    if len(trained) < len(rows):
        p += ("; a zero-shot row is the untrained policy (no SFT, no training) scored by its method's margin rule: "
              "what its likelihood knows before training")
    return f"{what} {where}; {p}."


def wall_time(seconds):
    return "–" if seconds is None else f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.0f} min"


def tier_cells(tiers, with_counts):
    """A row's per-tier accuracies ("–": a run not on arith, or a tier without pairs), with each tier's pairs."""
    return [f"{k / n:.3f}" + f" ({n})" * with_counts if n else "–"
            for k, n in (tiers or dict.fromkeys(arith.TIERS, (0, 0))).values()]


def summary(folder):
    """The calibration table from the runs' own files: the method, sizes and data source each run recorded (a
    column where they differ between rows, else said once), per-tier accuracy for arith, and the calibration runs
    left out, with why."""
    rows, left_out = calibration_rows(folder)
    show_sizes = len({r["n_train"] for r in rows if r["lr"] is not None}) > 1 or len({r["n_val"] for r in rows}) > 1
    columns = ["method"] * (len({r["method"] for r in rows}) > 1) + ["model", "lr"] + \
        ["data"] * (len({r["data"] for r in rows}) > 1) + ["train pairs", "validation pairs"] * show_sizes
    tiered = [r["tiers"] for r in rows if r["tiers"]]
    per_tier = {tuple(n for _, n in tiers.values()) for tiers in tiered}  # the tiers' pair counts, one per row
    short = sweep.short_models(r["model"] for r in rows)
    cells = []
    for r in rows:
        values = {"method": r["method"], "model": short.get(r["model"], r["model"]),
                  "lr": "– (zero-shot)" if r["lr"] is None else f"{r['lr']:g}" + (
                      f" (head {r['head_lr']:g})" if r["head_lr"] else ""), "data": r["data"],
                  "train pairs": "–" if r["lr"] is None else r["n_train"], "validation pairs": r["n_val"]}
        tiers = tier_cells(r["tiers"], with_counts=len(per_tier) > 1) if tiered else []
        cells.append([values[c] for c in columns] + [f"{r['accuracy']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]",
                                                     *tiers, f"{r['mean_abs_margin']:.3f}", f"{r['mean_abs_p']:.3f}",
                                                     f"{r['share_beyond_0.1']:.3f}",
                                                     wall_time(r["seconds"])])
    note = sweep.models_note(short)
    if tiered:
        counts = (" (" + ", ".join(f"{t} {n}" for t, n in zip(arith.TIERS, next(iter(per_tier)))) + " pairs)"
                  if len(per_tier) == 1 else " (its pairs in brackets)")
        note = (note + " " if note else "") + f"Per tier: the accuracy on that tier's validation pairs{counts}."
    lines = [f"`python tools/calibrate.py --summarize {folder}`: {described(rows, show_sizes)}",
             "", *([note, ""] if note else []),
             *sweep.table(columns + ["validation accuracy [95% CI]", *list(arith.TIERS) * bool(tiered),
                                     "mean \\|margin\\|", "mean \\|p − 0.5\\|", "share of p beyond 0.1",
                                     "wall time"], cells)]
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
