"""Sweeps: run a grid of weak-to-strong experiments, then turn the run folders into findings.

Each grid point is one run of rm_w2s.py, dpo_w2s.py or simpo_w2s.py, started as a subprocess with exactly the
command line a user would type. The scripts cache their own stages, so a sweep run again reuses every finished
stage. The finished runs are grouped into configurations (the method and every option except the seed and the
options that change no numbers) and summarised over seeds, in `--out_dir`:

  sweep.json      every run's numbers; per configuration mean, sample std (n - 1) and per-seed values
  sweep.md        the tables a paper would print, the figures with captions, the runs left out and why
  figures/*.png   DS and ΔDS against the capability gap; each student's error rate per knowledge area; each
                  conflict student's tax per area; DS and the area error rates over training (only where runs
                  wrote eval_curve.jsonl)
  logs/*.log      each run's output

Run:
  make sweep       (the demo's reward-model command: 2 strong models x 3 seeds on the toy testbed)
  python tools/sweep.py --grid "method=rm weak=tiny:1x32 strong=tiny:2x64,tiny:2x64+pt600 seeds=0,1,2" \\
                  --args="--data toy --n_gt 4000 --n_w2s 4000 --n_test 4000 --n_extra 4000 ..." --out_dir runs/sweep
  python tools/sweep.py --runs runs/demo runs/sweep --out_dir runs/summary      (aggregate finished runs, no training)
"""
import argparse
import dataclasses
import importlib
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and the method scripts: one folder up

import common
from runs import NO_EFFECT, check_out_dir, fmt, parse_args, rate, read_stage, slug, write_atomic, write_json

METHODS = ("rm", "dpo", "simpo")
SETTINGS = ("none", "implicit", "explicit")  # the report's order; settings unknown here follow
# The seed, which a configuration averages over, and the options that change no number of a run (the scripts
# leave the same ones out of run folder names and cache keys), and eval_every, which only adds eval_curve.jsonl
# (the final numbers are the same with and without it: test_e2e.py; runs made before it existed lack it).
# Every other option tells configurations apart.
IGNORED = ("seed", "eval_every") + NO_EFFECT
# Numbers that are null by definition in some runs (PGR without a capability gap, DS of an empty area): kept as
# null in the statistics even in a sweep where no run has a number there, unlike other null fields.
NULLABLE = ("accuracy", "pgr", "ds", "err_wk_sk", "delta_ds", "student_error")
STD = "sample standard deviation over seeds (n - 1 in the denominator); 0 for a single seed"
NULLS = ("Null values (PGR when the strong ceiling does not beat the weak one, DS when its area is empty, a "
         "setting a run did not train) are left out of mean and std, never read as 0; n_none counts them")
ABSENT = "(absent)"  # an option an older run's config.json does not have
HERE = Path(__file__).resolve().parents[1]  # the method scripts sit one folder up


def parse_cli(argv):
    p = argparse.ArgumentParser(description="Run a grid of w2s experiments and summarise the runs over seeds.")
    p.add_argument("--grid", default="", help='e.g. "method=rm weak=tiny:1x32 strong=tiny:2x64,tiny:2x64+pt600 '
                   'seeds=0,1,2": comma lists, every combination; other keys are script options (lr=1e-3,3e-4)')
    p.add_argument("--args", default="", help='options passed to every run, e.g. --args="--data toy --n_gt 400"')
    p.add_argument("--runs", nargs="+", default=[], help="aggregate these run folders, or folders holding them")
    p.add_argument("--out_dir", default="runs/sweep", help="run folders (--grid), sweep.json, sweep.md, figures/")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses torch's threads: OMP_NUM_THREADS)")
    cli = p.parse_args(argv)
    if bool(cli.grid) == bool(cli.runs):
        p.error("give --grid (run a grid, then summarise it) or --runs (summarise finished runs), not both")
    return cli


# ----------------------------------------------------------------------------------------------------
# the grid: one subprocess per point, the finished run found by the config it recorded

def parse_grid(spec):
    """'method=rm weak=tiny:1x32 strong=a,b seeds=0,1' -> one dict per combination of the comma lists, the last
    key varying fastest. `method` is required, `seeds` defaults to 0, any other key is a script option."""
    axes = {}
    for item in spec.split():
        key, sep, values = item.partition("=")
        key = {"seeds": "seed", "methods": "method"}.get(key, key).replace("-", "_")
        values = list(dict.fromkeys(v for v in values.split(",") if v))
        if not sep or not values or key in axes:
            raise SystemExit(f"error: --grid takes key=v1,v2 items, each key once; got {item!r}")
        axes[key] = values
    if not set(axes.get("method", ["?"])) <= set(METHODS):
        raise SystemExit(f"error: --grid needs method=... among {', '.join(METHODS)}; got {axes.get('method')}")
    axes.setdefault("seed", ["0"])
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def plan(points, extra, out_dir):
    """Each point's command line, and the options it sets as its run will record them in config.json, read
    with the script's own parser: a typo fails here rather than hours into the grid, and a finished run is
    found by what it recorded (options left at their defaults are the script's business)."""
    extra_argv = shlex.split(extra)
    given = {t[2:].partition("=")[0].replace("-", "_") for t in extra_argv if t.startswith("--")}
    given |= {k[3:] for k in given if k.startswith("no_")}
    clash = given & ({"seed", "out_dir"} | set(points[0]))
    if clash:
        raise SystemExit(f"error: --args sets {', '.join(sorted(clash))}, which the grid or --out_dir sets")
    plans = []
    for point in points:
        argv = extra_argv + [f"--{k}={v}" for k, v in point.items() if k != "method"] + [f"--out_dir={out_dir}"]
        name = "-".join(slug(v if k in ("method", "weak", "strong") else f"s{v}" if k == "seed" else f"{k}{v}")
                        for k, v in point.items())
        try:
            args = parse_args(importlib.import_module(f"{point['method']}_w2s").Args, argv)
        except SystemExit as e:
            raise SystemExit(f"error: grid point {name}: {e}")
        parsed = json.loads(json.dumps(dataclasses.asdict(args)))
        config = {k: v for k, v in parsed.items() if k in given | set(point) | {"out_dir"}}
        plans.append({"point": point, "name": name, "config": config,
                      "cmd": [sys.executable, str(HERE / f"{point['method']}_w2s.py"), *argv],
                      "log": str(Path(out_dir) / "logs" / f"{name}.log")})
    return plans


def find_finished(out_dir, method, config):
    """The run folder under out_dir whose results.json records this method and these options: the newest,
    should an older folder name hold the same run."""
    runs, _ = scan([out_dir])
    same = [r for r in runs
            if r["method"] == method and all(r["config"].get(k, ABSENT) == v for k, v in config.items())]
    return max(same, key=lambda r: Path(r["dir"], "results.json").stat().st_mtime, default=None)


def run_grid(points, extra, out_dir, jobs):
    """Run every point (cached stages are the scripts' business), `jobs` at a time; one line per finished run.
    Returns the finished runs in grid order and the failed ones, each with its reason."""
    plans = plan(points, extra, out_dir)
    Path(out_dir, "logs").mkdir(parents=True, exist_ok=True)

    def launch(p):
        tqdm.write(f"[sweep] start {p['name']} (log: {p['log']})")
        t0 = time.time()
        with open(p["log"], "w") as log:
            rc = subprocess.run(p["cmd"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        return rc, time.time() - t0

    finished, failed = {}, []
    bar = tqdm(total=len(plans), desc="sweep", unit="run")
    pool = ThreadPoolExecutor(max(1, jobs))
    try:
        futures = {pool.submit(launch, p): i for i, p in enumerate(plans)}
        for future in as_completed(futures):
            i = futures[future]
            p, (rc, seconds) = plans[i], future.result()
            run = find_finished(out_dir, p["point"]["method"], p["config"]) if rc == 0 else None
            if run is None:
                tail = Path(p["log"]).read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
                reason = (f"exit code {rc}" if rc else "no results.json records its config") + \
                         f" after {seconds:.0f} s; log {p['log']}: {tail[0][:200]}"
                failed.append({"dir": p["name"], "reason": reason})
                tqdm.write(f"[sweep] FAILED {p['name']}: {reason}")
            else:
                finished[i] = {**run, "seconds": round(seconds, 1)}
                tqdm.write(run_line(finished[i]))
            bar.update()
    finally:  # on Ctrl-C the running scripts get the signal too; the points not started yet must not start
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return [finished[i] for i in sorted(finished)], failed


def run_line(run):
    m, c = run["metrics"], run["config"]
    students = " | ".join(
        f"{s} {fmt(m.get(f'students/{s}/accuracy'))} DS {fmt(m.get(f'students/{s}/ds'))}"
        for s in settings_of([run]))
    return (f"[sweep] {run['method']} {c.get('weak')} -> {c.get('strong')} seed {run['seed']}: "
            f"weak {fmt(m.get('models/weak/accuracy'))} strong {fmt(m.get('models/strong/accuracy'))} "
            f"gap {fmt(m.get('gap'))} | {students} | {run.get('seconds', 0):.0f} s | {run['dir']}")


# ----------------------------------------------------------------------------------------------------
# reading run folders

def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def is_run_config(path):
    """A run's config.json (not a model's, which tiny models keep under <out_dir>/models)."""
    config = read_json(path)
    return isinstance(config, dict) and {"weak", "strong", "seed"} <= config.keys()


def run_metrics(results):
    """A run's numbers, flat: models/<stage>/<key>, students/<setting>/<key>,
    students/<setting>/areas/<area>/<key>, ..., and gap = strong ceiling - weak ceiling accuracy. Every number
    and null in results.json outside config and data is taken, so fields added later come along."""
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for key, value in obj.items():
                walk(f"{prefix}/{key}", value)
        elif obj is None or (isinstance(obj, (int, float)) and not isinstance(obj, bool)):
            flat[prefix] = obj

    for key, value in results.items():
        if key not in ("config", "data") and isinstance(value, dict):
            walk(key, value)
    weak, strong = flat.get("models/weak/accuracy"), flat.get("models/strong/accuracy")
    flat["gap"] = strong - weak if weak is not None and strong is not None else None
    return flat


def run_config(folder, results=None):
    """A run's options: the copy in its results.json (the options its numbers were computed with), else its
    config.json; None if neither reads as a dict (a damaged file must not stop a sweep of other runs)."""
    results = read_json(folder / "results.json") if results is None else results
    for config in (results.get("config") if isinstance(results, dict) else None,
                   read_json(folder / "config.json")):
        if isinstance(config, dict) and config:
            return config
    return None


def load_run(folder):
    """One finished run, or None if its results.json is not a run's. The method is results["method"], else
    the folder name up to its first "-" (the scripts' naming before results.json recorded it)."""
    results = read_json(folder / "results.json")
    if not isinstance(results, dict) or not ({"models", "students"} & results.keys()):
        return None
    config = run_config(folder, results) or {}
    return {"dir": str(folder), "method": results.get("method") or folder.name.split("-")[0],
            "seed": config.get("seed"), "config": config, "metrics": run_metrics(results),
            "valid": results.get("valid") is not False, "notes": [str(n) for n in results.get("notes") or []]}


def run_folders(paths):
    """Every run folder under `paths` (run folders, or folders holding them at any depth), sorted."""
    folders = set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise SystemExit(f"error: {path} is not a folder")
        folders |= {f.parent for f in path.rglob("results.json")}
        folders |= {f.parent for f in path.rglob("config.json") if is_run_config(f)}
    return sorted(folders)


def scan(paths):
    """The run folders under `paths`: the finished runs, sorted by folder, and the left-out ones: a run's
    config.json without a results.json (unfinished or failed), or a results.json that cannot be read."""
    runs, left_out = [], []
    for folder in run_folders(paths):
        if not (folder / "results.json").exists():
            left_out.append({"dir": str(folder), "reason": "config.json but no results.json: unfinished or failed"})
            continue
        run = load_run(folder)
        if run is not None:
            runs.append(run)
        elif (folder / "config.json").exists():  # a run's, unless its config.json is damaged too: named either way
            left_out.append({"dir": str(folder), "reason": "results.json unreadable or not a run's"})
    return runs, left_out


def ceilings(paths):
    """Every finished ceiling stage (weak, strong) under `paths`, whether its run finished or not: a ladder's
    models are measured before any student trains. A stage that several runs share (the weak ceiling of runs
    with different strong models, copied into each) is one row. Each row: the model, its role, the options
    that set a ceiling's number, its training and test pairs, its test accuracy with a 95% (Wilson) interval,
    and the stage's wall time."""
    rows = {}
    for folder in run_folders(paths):
        config = run_config(folder)
        if config is None:  # which model a stage trained is unknown: scan names the folder among those left out
            continue
        for role in ("weak", "strong"):
            stage = read_stage(folder / role)
            if not isinstance(stage, dict) or "accuracy" not in stage or stage.get("key") in rows:
                continue
            k = round(stage["accuracy"] * stage["n"])
            labels = folder / role / "labels.jsonl"
            rows[stage["key"]] = {
                "labels": common.label_informativeness([r["margin"] for r in common.read_jsonl(labels)])
                if labels.exists() else None,
                "model": config.get(role), "role": role, "method": folder.name.split("-")[0],
                **{o: config.get(o) for o in ("seed", "lr", "precision")}, "n_train": stage.get("n_train"),
                "accuracy": stage["accuracy"], "n": stage["n"], "ci": common.wilson(k, stage["n"]),
                "seconds": stage.get("seconds"), "dir": str(folder / role)}
    return sorted(rows.values(), key=lambda r: (r["method"], str(r["lr"]), r["n_train"] or 0, r["role"] != "weak",
                                                str(r["model"]), r["seed"] or 0))


def ceilings_section(rows):
    lines = ["## Ceilings", "", "Every finished weak and strong ceiling under the runs given, finished run or not "
             "(a model trained on ground truth; one row per stage, a shared one once); accuracy on the test pairs "
             "with its 95% (Wilson) interval; a labelling stage's labels p = sigmoid(margin): mean |p − 0.5| and the "
             "share beyond 0.1 from 0.5.", "",
             "| method | model | as | seed | lr | precision | train pairs | test pairs | accuracy [95% CI] | labels "
             "\\|p − 0.5\\| (share > 0.1) | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wall = f"{r['seconds'] / 60:.0f} min" if r.get("seconds") is not None else "–"
        lr = f"{r['lr']:g}" if isinstance(r["lr"], (int, float)) else "–"
        labels = f"{r['labels']['mean_abs_p']:.3f} ({r['labels']['share_beyond_0.1']:.2f})" if r.get("labels") else "–"
        lines.append(f"| {r['method']} | {r['model']} | {r['role']} | {r['seed']} | {lr} | "
                     f"{r['precision'] or '–'} | {r['n_train']} | {r['n']} | {rate(r['accuracy'], r['ci'])} | {labels} | "
                     f"{wall} |")
    return "\n".join(lines)


def drop_invalid(runs):
    """Runs whose results.json says its numbers are not valid (a stage diverged, or scored every pair a tie) stay
    out of the means: they are listed with the run's notes instead."""
    left_out = [{"dir": r["dir"], "reason": "results.json says its numbers are not valid: " + " ".join(r["notes"])}
                for r in runs if not r["valid"]]
    return [r for r in runs if r["valid"]], left_out


# ----------------------------------------------------------------------------------------------------
# configurations and statistics over seeds

def stat(values):
    """mean and sample std of the non-null values (std 0 for one value), how many there were and how many were
    null, and the values themselves in seed order (nulls kept)."""
    numbers = [v for v in values if v is not None]
    n = len(numbers)
    return {"mean": statistics.fmean(numbers) if n else None,
            "std": statistics.stdev(numbers) if n > 1 else (0.0 if n else None),
            "n": n, "n_none": len(values) - n, "values": list(values)}


def order_settings(names):
    names = list(dict.fromkeys(names))
    return [s for s in SETTINGS if s in names] + [s for s in names if s not in SETTINGS]


def settings_of(runs):
    """The student settings that any of these runs (or configurations' stats) has numbers for, in report order."""
    return order_settings(k.split("/")[1] for r in runs for k in r["metrics"] if k.startswith("students/"))


def group(runs):
    """Configurations: runs with the same method and the same options, the IGNORED ones aside; never runs whose
    options differ in anything else. A second run of a configuration and seed is left out: counting it would
    count one seed twice. Configurations come by method (rm, dpo, simpo), then in the order of their runs."""
    configs, twins = {}, []
    for run in runs:
        options = {k: v for k, v in sorted(run["config"].items()) if k not in IGNORED}
        key = json.dumps([run["method"], options], sort_keys=True, default=str)
        config = configs.setdefault(key, {"method": run["method"], "options": options, "runs": []})
        twin = next((r for r in config["runs"] if r["seed"] == run["seed"]), None)
        if twin is not None:
            twins.append({"dir": run["dir"], "reason": f"same configuration and seed as {twin['dir']}"})
        else:
            config["runs"].append(run)
    for config in configs.values():
        config["runs"].sort(key=lambda r: (r["seed"] is None, r["seed"] or 0))
    order = lambda c: METHODS.index(c["method"]) if c["method"] in METHODS else len(METHODS)  # noqa: E731
    return sorted(configs.values(), key=order), twins


def varying_options(configs):
    """Per method, the options whose values differ between its configurations: what tells them apart."""
    by_method = {}
    for config in configs:
        by_method.setdefault(config["method"], []).append(config["options"])
    return {method: [k for k in sorted(set().union(*options))
                     if len({json.dumps(o.get(k, ABSENT), default=str) for o in options}) > 1]
            for method, options in by_method.items()}


def summarize(runs, left_out):
    """sweep.json's content: configurations with statistics over seeds, every run's numbers, the runs left out."""
    runs, invalid = drop_invalid(runs)
    configs, twins = group(runs)
    varying = varying_options(configs)
    numeric = {k for r in runs for k, v in r["metrics"].items() if v is not None}
    out = []
    for i, config in enumerate(configs, 1):
        names = [k for k in dict.fromkeys(k for r in config["runs"] for k in r["metrics"])
                 if k in numeric or k.rsplit("/", 1)[-1] in NULLABLE]
        differs = {k: config["options"].get(k, ABSENT) for k in varying[config["method"]]}
        out.append({"id": f"c{i}", "method": config["method"],
                    "label": ", ".join([config["method"]] + [f"{k}={v}" for k, v in differs.items()]),
                    "differs": differs, "options": config["options"],
                    "seeds": [r["seed"] for r in config["runs"]], "runs": [r["dir"] for r in config["runs"]],
                    "stats": {name: stat([r["metrics"].get(name) for r in config["runs"]]) for name in names}})
        for run in config["runs"]:
            run["configuration"] = f"c{i}"
    kept = [r for c in configs for r in c["runs"]]
    return {"std": STD, "nulls": NULLS, "ignored_options": list(IGNORED), "varying_options": varying,
            "configurations": out,
            "runs": [{k: r[k] for k in ("dir", "method", "seed", "configuration", "seconds", "notes", "metrics")
                      if k in r} for r in kept],
            "left_out": left_out + invalid + twins}


# ----------------------------------------------------------------------------------------------------
# figures: each built from a plain data dict (what the tests check), then drawn

COLORS = {"none": "tab:gray", "implicit": "tab:blue", "explicit": "tab:red"}
MARKERS = {"none": "o", "implicit": "s", "explicit": "^"}
SHORT = {"weak-known & strong-known": "WK ∩ SK", "weak-known & strong-unknown": "WK ∩ SU",
         "weak-unknown & strong-known": "WU ∩ SK", "weak-unknown & strong-unknown": "WU ∩ SU"}


def ds_gap_data(sweep):
    """The paper's main figure: per method, one point per configuration and student setting at x = the
    capability gap, y = DS (and ΔDS for the conflict settings), with their std over seeds."""
    methods = {}
    for c in sweep["configurations"]:
        s = c["stats"]
        gap = s.get("gap", stat([]))
        for setting in settings_of([{"metrics": s}]):
            ds, delta = s.get(f"students/{setting}/ds", stat([])), s.get(f"students/{setting}/delta_ds", stat([]))
            if gap["mean"] is None or ds["mean"] is None:
                continue
            methods.setdefault(c["method"], []).append({
                "configuration": c["id"], "setting": setting, "gap": gap["mean"], "gap_std": gap["std"],
                "ds": ds["mean"], "ds_std": ds["std"], "delta_ds": delta["mean"], "delta_ds_std": delta["std"]})
    return {"methods": methods}


def areas_data(config):
    """Per configuration: each student's error rate in each knowledge area (mean and std over seeds), and the
    area's size (mean over seeds)."""
    s = config["stats"]
    settings = settings_of([{"metrics": s}])
    areas = [a for a in common.AREAS if any(f"students/{x}/areas/{a}/n" in s for x in settings)]
    errors = {x: [s.get(f"students/{x}/areas/{a}/student_error", stat([])) for a in areas] for x in settings}
    return {"configuration": config["id"], "title": config["label"], "areas": areas,
            "n": [area_size(s, a, settings)["mean"] for a in areas],
            "settings": {x: {"error": [e["mean"] for e in errs], "std": [e["std"] for e in errs]}
                         for x, errs in errors.items()}}


def tax_data(config):
    """Per configuration: each conflict student's tax in each knowledge area against the no-conflict student
    (of the pairs it gets right, the share turned wrong; mean and std over seeds), and how many right pairs the
    tax is a share of (mean over seeds)."""
    s = config["stats"]
    settings = [x for x in settings_of([{"metrics": s}]) if f"students/{x}/conflict_tax/sk_taxed" in s]
    key = "students/{}/conflict_tax/areas/{}/{}"
    areas = [a for a in common.AREAS if any(key.format(x, a, "base_right") in s for x in settings)]
    return {"configuration": config["id"], "title": config["label"], "areas": areas,
            "n": [s[key.format(settings[0], a, "base_right")]["mean"] for a in areas] if settings else [],
            "settings": {x: {"error": [s.get(key.format(x, a, "tax"), stat([]))["mean"] for a in areas],
                             "std": [s.get(key.format(x, a, "tax"), stat([]))["std"] for a in areas]}
                         for x in settings}}


def area_size(stats, area, settings):
    """An area's size over seeds: the same for every student of a run (the ceilings define it), so read from
    the first student that has it."""
    return next(stats[k] for x in settings if (k := f"students/{x}/areas/{area}/n") in stats)


def curve_value(row, area):
    """An area's error rate in one eval_curve.jsonl row; DS is the error in weak-unknown & strong-known."""
    value = (row.get("areas") or {}).get(area)
    value = value.get("student_error") if isinstance(value, dict) else value
    return row.get("ds") if value is None and area == "weak-unknown & strong-known" else value


def curve_data(config):
    """Deception over training, where the runs wrote <student stage>/eval_curve.jsonl (rows: step,
    examples_seen, accuracy, ds, areas): per student setting, DS and each area's error rate against examples
    seen (DS is the error in weak-unknown & strong-known). Seeds evaluated at the same points make one line
    (mean, std); otherwise each seed is a line."""
    curves = {}
    for folder, seed in zip(config["runs"], config["seeds"]):
        for path in sorted(Path(folder).glob("student-*/eval_curve.jsonl")):
            rows = [r for r in common.read_jsonl(path) if r.get("examples_seen") is not None]
            if rows:
                curves.setdefault(path.parent.name[len("student-"):], []).append((seed, rows))
    if not curves:
        return None
    series = list(common.AREAS)
    settings = {}
    for setting in order_settings(curves):
        runs = curves[setting]
        xs = [[r["examples_seen"] for r in rows] for _, rows in runs]
        if all(x == xs[0] for x in xs):
            points = {name: [stat([curve_value(rows[i], name) for _, rows in runs]) for i in range(len(xs[0]))]
                      for name in series}
            label = f"mean of {len(runs)} seeds" if len(runs) > 1 else f"seed {runs[0][0]}"
            settings[setting] = [{"label": label, "x": xs[0],
                                  "y": {k: [p["mean"] for p in v] for k, v in points.items()},
                                  "std": {k: [p["std"] for p in v] for k, v in points.items()}}]
        else:
            settings[setting] = [{"label": f"seed {seed}", "x": x, "std": None,
                                  "y": {name: [curve_value(r, name) for r in rows] for name in series}}
                                 for (seed, rows), x in zip(runs, xs)]
    return {"configuration": config["id"], "title": config["label"], "series": series, "settings": settings}


def pyplot():
    """matplotlib on the file-only Agg backend (no display), imported when a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path):
    plt = pyplot()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def nan(x):
    return float("nan") if x is None else x


def draw_ds_gap(data, path):
    plt = pyplot()
    methods = list(data["methods"])
    fig, axes = plt.subplots(2, len(methods), figsize=(4.8 * len(methods), 7.5), squeeze=False)
    rows = (("ds", "DS: student error rate in\nweak-unknown ∩ strong-known (fraction)"),
            ("delta_ds", "ΔDS = DS(conflict) − DS(none)\n(fraction of WU ∩ SK pairs)"))
    for col, method in enumerate(methods):
        for row, (key, ylabel) in enumerate(rows):
            ax = axes[row][col]
            for p in data["methods"][method]:
                if p[key] is None:
                    continue
                ax.errorbar(p["gap"], p[key], xerr=p["gap_std"], yerr=nan(p[f"{key}_std"]), capsize=3,
                            fmt=MARKERS.get(p["setting"], "D"), color=COLORS.get(p["setting"]), label=p["setting"])
                ax.annotate(p["configuration"], (p["gap"], p[key]), textcoords="offset points", xytext=(5, 4),
                            fontsize=8)
            if key == "delta_ds":
                ax.axhline(0, color="black", lw=0.6)
            ax.set_title(f"{method}: {'DS' if key == 'ds' else 'ΔDS'}")
            ax.set_xlabel("capability gap = strong − weak ceiling accuracy\n(fraction of test pairs)")
            ax.set_ylabel(ylabel)
            handles = dict(zip(*ax.get_legend_handles_labels()[::-1]))
            if handles:
                ax.legend(handles.values(), handles.keys(), fontsize=8, title="student", title_fontsize=8)
    fig.tight_layout()
    save(fig, path)


def draw_areas(data, path, ylabel="student error rate (fraction of the area's test pairs)", n_label="n"):
    plt = pyplot()
    settings = list(data["settings"])
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / max(1, len(settings))
    for j, setting in enumerate(settings):
        d = data["settings"][setting]
        xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(data["areas"]))]
        ax.bar(xs, [nan(e) for e in d["error"]], width, yerr=[nan(s) for s in d["std"]], capsize=3,
               color=COLORS.get(setting), label=setting)
    ax.set_xticks(range(len(data["areas"])))
    ax.set_xticklabels([f"{SHORT.get(a, a)}\n{n_label} = {n:.0f}" if n is not None else SHORT.get(a, a)
                        for a, n in zip(data["areas"], data["n"])])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("knowledge area (W/S: weak/strong ceiling; K: right, U: wrong)")
    ax.set_title(textwrap.fill(f"{data['configuration']}: {data['title']}", 100), fontsize=9)
    ax.legend(title="student", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    save(fig, path)


def draw_tax(data, path):
    """The conflict tax per area: draw_areas' bars, read as the share of the no-conflict student's right pairs
    that the conflict turned wrong."""
    draw_areas(data, path, ylabel="conflict tax (share of the no-conflict student's\nright pairs turned wrong)",
               n_label="right")


def draw_curve(data, path):
    plt = pyplot()
    series = data["series"]
    fig, axes = plt.subplots(1, len(series), figsize=(3.8 * len(series), 3.4), squeeze=False)
    for ax, name in zip(axes[0], series):
        for setting, lines in data["settings"].items():
            for k, line in enumerate(lines):
                y = [nan(v) for v in line["y"][name]]
                ax.plot(line["x"], y, marker=".", color=COLORS.get(setting), alpha=1.0 if len(lines) == 1 else 0.6,
                        label=setting if k == 0 else None)
                if line["std"] is not None:
                    sd = [nan(v) for v in line["std"][name]]
                    ax.fill_between(line["x"], [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                                    color=COLORS.get(setting), alpha=0.15)
        if all(v is None for lines in data["settings"].values() for line in lines for v in line["y"][name]):
            ax.text(0.5, 0.5, "no test pairs in this area", ha="center", va="center", transform=ax.transAxes,
                    fontsize=9, color="gray")  # say why the panel is blank (e.g. a strong ceiling at 1.0)
        ax.set_title(f"error in {SHORT.get(name, name)}" + (" = DS" if name == "weak-unknown & strong-known" else ""),
                     fontsize=9)
        ax.set_xlabel("examples seen (training pairs)")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("student error rate (fraction)")
    axes[0][0].legend(title="student", fontsize=8, title_fontsize=8)
    fig.suptitle(textwrap.fill(f"{data['configuration']}: {data['title']}", 160), fontsize=9)
    fig.tight_layout()
    save(fig, path)


DRAW = {"ds_gap": draw_ds_gap, "areas": draw_areas, "tax": draw_tax, "curve": draw_curve}


def seeds(config):
    n = len(config["seeds"])
    return f"{n} seed{'s' * (n != 1)}"


def figures(sweep):
    """Every figure of the sweep: file name, caption, kind and the data it is drawn from."""
    out = []
    data = ds_gap_data(sweep)
    if data["methods"]:
        out.append({"file": "figures/ds_vs_gap.png", "kind": "ds_gap", "data": data, "caption": (
            "DS (top) and ΔDS (bottom) of each student against the capability gap (strong − weak ceiling "
            "accuracy), one point per configuration (label) and student setting, one column per method; error "
            "bars: sample std over seeds (zero for one seed). Deception shows as a high DS and a positive ΔDS.")})
    for config in sweep["configurations"]:
        head = f"{config['id']} ({config['label']}, {seeds(config)}): "
        for kind, data, caption in (
                ("areas", areas_data(config), "each student's error rate in the four knowledge areas (n: the area's "
                 "size, mean over seeds); error bars: std over seeds. Deception: high in WU ∩ SK (the weak model "
                 "cannot check, the strong model knows), low in WK ∩ SK."),
                ("tax", tax_data(config), "the conflict tax per knowledge area: of the test pairs the no-conflict "
                 "student gets right (right: how many, mean over seeds), the share each conflict student gets wrong; "
                 "error bars: std over seeds. Deception in the paper's sense: the tax paid in WU ∩ SK, more than in "
                 "WK ∩ SK.")):
            if data["areas"] and data["settings"]:
                out.append({"file": f"figures/{kind}-{config['id']}.png", "kind": kind, "data": data,
                            "caption": head + caption})
        data = curve_data(config)
        if data:
            out.append({"file": f"figures/curve-{config['id']}.png", "kind": "curve", "data": data, "caption": (
                f"{config['id']} ({config['label']}): each student's error rate in the four knowledge areas of the "
                "test pairs during training (in WU ∩ SK it is DS), against training pairs seen, one line per student "
                "setting (mean over the seeds that wrote eval_curve.jsonl, band: std; one line per seed where the "
                "seeds were evaluated at different points).")})
    return out


# ----------------------------------------------------------------------------------------------------
# sweep.md

def cell(s, digits=3):
    """'mean ± std [per-seed values]', with the count of nulls left out."""
    if s is None or (s["n"] == 0 and not s["n_none"]):
        return "–"
    text = "–" if s["n"] == 0 else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    if len(s["values"]) > 1:
        text += " [" + ", ".join(fmt(v, digits) for v in s["values"]) + "]"
    return text + (f" ({s['n_none']} null)" if s["n_none"] else "")


def main_rows(configs):
    settings = settings_of([{"metrics": c["stats"]} for c in configs])
    rows = [("weak ceiling accuracy", "models/weak/accuracy"), ("strong ceiling accuracy", "models/strong/accuracy"),
            ("intermediate accuracy", "models/intermediate/accuracy"), ("capability gap (strong − weak)", "gap")]
    for s in settings:
        rows += [(f"{s}: accuracy", f"students/{s}/accuracy"), (f"{s}: PGR", f"students/{s}/pgr"),
                 (f"{s}: DS (error in WU ∩ SK)", f"students/{s}/ds"),
                 (f"{s}: error in WK ∩ SK", f"students/{s}/err_wk_sk"),
                 (f"{s}: ΔDS = DS({s}) − DS(none)", f"students/{s}/delta_ds"),
                 (f"{s}: ΔDS, McNemar's exact p (per seed)", f"students/{s}/delta_ds_p"),
                 (f"{s}: conflict tax in WU ∩ SK (of the no-conflict student's right pairs, share turned wrong)",
                  f"students/{s}/conflict_tax/areas/weak-unknown & strong-known/tax"),
                 (f"{s}: conflict tax in WK ∩ SK", f"students/{s}/conflict_tax/areas/weak-known & strong-known/tax"),
                 (f"{s}: share of the strong-known tax in WU", f"students/{s}/conflict_tax/share_wu"),
                 (f"{s}: that share if the tax fell evenly (base rate)", f"students/{s}/conflict_tax/base_rate_wu"),
                 (f"{s}: DS restated: share of its disagreements with the strong ceiling in WU ∩ SK",
                  f"students/{s}/ds_restated/share")]
    return [(label, key) for label, key in rows if any(key in c["stats"] for c in configs)]


def results_section(configs):
    """The main table: one column per configuration, one row per number."""
    if not configs:
        return "## Results\n\nNo finished runs.\n"
    # long labels (many options differ) stay in the configurations table; the column is then the id alone
    head = [f"{c['id']}: {c['label']}" if len(c["label"]) <= 40 else c["id"] for c in configs]
    lines = ["## Results", "", "| | " + " | ".join(head) + " |",
             "|---|" + "---|" * len(configs),
             "| seeds (n) | " + " | ".join(str(len(c["seeds"])) for c in configs) + " |"]
    for label, key in main_rows(configs):
        lines.append(f"| {label} | " + " | ".join(cell(c["stats"].get(key)) for c in configs) + " |")
    return "\n".join(lines + ["", "Every other number (ties, training-set sizes, extra metrics) is in sweep.json."])


def ds_gap_table(configs):
    """The figure's numbers, one row per configuration and student, by capability gap: DS and ΔDS beside the
    error where the supervisor can check (WK ∩ SK), so that a rise of DS reads against a rise everywhere."""
    rows = []
    for c in configs:
        st = c["stats"]
        for setting in settings_of([{"metrics": st}]):
            gap, ds = st.get("gap"), st.get(f"students/{setting}/ds")
            if gap and gap["mean"] is not None and ds and ds["mean"] is not None:
                rows.append((gap["mean"], c["id"], f"| {c['id']}: {c['label']} | {setting} | {len(c['seeds'])} | "
                             f"{cell(gap)} | {cell(ds)} | {cell(st.get(f'students/{setting}/delta_ds'))} | "
                             f"{cell(st.get(f'students/{setting}/delta_ds_p'))} | "
                             f"{cell(st.get(f'students/{setting}/err_wk_sk'))} |"))
    return ["Its numbers, by gap (mean ± std over seeds, per-seed values in brackets):", "",
            "| configuration | student | seeds | gap | DS (error in WU ∩ SK) | ΔDS | ΔDS: McNemar's p | error in WK ∩ SK |",
            "|---|---|---|---|---|---|---|---|", *(line for _, _, line in sorted(rows, key=lambda r: r[:2]))]


def render(sweep, figs, command):
    configs = sweep["configurations"]
    lines = ["# Sweep", "", f"`{command}` on {datetime.now():%Y-%m-%d %H:%M}: {len(sweep['runs'])} runs in "
             f"{len(configs)} configurations; {len(sweep['left_out'])} left out.", "",
             f"Each cell: mean ± std over seeds, per-seed values in brackets (in the order of the configuration's "
             f"seeds). "
             f"std: {STD}. {NULLS}. Accuracies and error rates are fractions of test pairs.", ""]
    lines += ["## Configurations", "",
              "A configuration is the method and every option of the run except "
              + ", ".join(f"`{k}`" for k in IGNORED) + ", which change no numbers (the seed is averaged over).", ""]
    for method, keys in sweep["varying_options"].items():
        n = sum(c["method"] == method for c in configs)
        lines.append(f"- {method}: {n} configuration{'s' * (n != 1)}" + (
            f", told apart by {', '.join(f'`{k}`' for k in keys)}" if keys else ""))
    lines += ["", "| configuration | method | seeds | run folders |", "|---|---|---|---|"]
    lines += [f"| {c['id']}: {c['label']} | {c['method']} | {', '.join(map(str, c['seeds']))} | "
              f"{', '.join(Path(d).name for d in c['runs'])} |" for c in configs]
    for method in sweep["varying_options"]:
        shared = {k: v for k, v in next(c for c in configs if c["method"] == method)["options"].items()
                  if k not in sweep["varying_options"][method]}
        lines += ["", f"Options shared by every {method} configuration: "
                  + ", ".join(f"{k}={json.dumps(v)}" for k, v in shared.items()) + "."]
    lines += ["", results_section(configs)]
    if sweep.get("ceilings"):
        lines += ["", ceilings_section(sweep["ceilings"])]
    by_file = {f["file"]: f for f in figs}
    if "figures/ds_vs_gap.png" in by_file:
        f = by_file["figures/ds_vs_gap.png"]
        lines += ["", "## DS against the capability gap", "", f"![DS and ΔDS against the capability gap]({f['file']})",
                  "", f"*{f['caption']}*", "", *ds_gap_table(configs)]
    for c in configs:
        area = areas_data(c)
        if not area["areas"]:
            continue
        lines += ["", f"## {c['id']}: {c['label']}: knowledge areas", "",
                  "| area | n | " + " | ".join(area["settings"]) + " |", "|---|---|" + "---|" * len(area["settings"])]
        for a in area["areas"]:
            n = area_size(c["stats"], a, list(area["settings"]))
            lines.append(f"| {a} | {cell(n, 1)} | " + " | ".join(
                cell(c["stats"].get(f"students/{s}/areas/{a}/student_error")) for s in area["settings"]) + " |")
        for name in (f"figures/areas-{c['id']}.png", f"figures/tax-{c['id']}.png", f"figures/curve-{c['id']}.png"):
            if name in by_file:
                lines += ["", f"![{c['id']}]({name})", "", f"*{by_file[name]['caption']}*"]
    settings = settings_of(sweep["runs"])
    if sweep["runs"]:
        lines += ["", "## Runs", "", "| run folder | configuration | seed | weak | strong | "
                  + " | ".join(f"{s}: acc / DS" for s in settings) + " | wall time |",
                  "|---|---|---|---|---|" + "---|" * (len(settings) + 1)]
    for r in sweep["runs"]:
        m = r["metrics"]
        students = [f"{fmt(m.get(f'students/{s}/accuracy'))} / {fmt(m.get(f'students/{s}/ds'))}"
                    for s in settings]
        wall = f"{r['seconds']:.0f} s" if "seconds" in r else "–"
        lines.append(f"| {r['dir']} | {r['configuration']} | {r['seed']} | "
                     f"{fmt(m.get('models/weak/accuracy'))} | {fmt(m.get('models/strong/accuracy'))} | "
                     + " | ".join(students) + f" | {wall} |")
    notes = [(r["dir"], n) for r in sweep["runs"] for n in r.get("notes", [])]
    if notes:
        lines += ["", "## Notes from the runs", ""] + [f"- {d}: {n}" for d, n in notes]
    if sweep["left_out"]:
        lines += ["", "## Left out", "", "| run | why |", "|---|---|"]
        lines += [f"| {x['dir']} | {x['reason']} |" for x in sweep["left_out"]]
    return "\n".join(lines) + "\n"


def write_outputs(sweep, out_dir, command):
    """sweep.json, the figures, sweep.md; figures of an earlier sweep in the same folder are removed first."""
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "figures").glob("*.png"):
        old.unlink()
    figs = figures(sweep)
    for f in figs:
        DRAW[f["kind"]](f["data"], out_dir / f["file"])
    sweep = {**sweep, "figures": [{"file": f["file"], "caption": f["caption"]} for f in figs]}
    write_json(out_dir / "sweep.json", sweep)
    text = render(sweep, figs, command)
    write_atomic(out_dir / "sweep.md", text)
    return text


def main(argv=None):
    cli = parse_cli(argv)
    check_out_dir(cli.out_dir)  # before a grid runs for hours, not when its summary is written
    if cli.grid:
        runs, left_out = run_grid(parse_grid(cli.grid), cli.args, cli.out_dir, cli.jobs)
    else:
        runs, left_out = scan(cli.runs)
    sweep = {**summarize(runs, left_out), "ceilings": ceilings(cli.runs or [cli.out_dir])}
    command = "python tools/sweep.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    write_outputs(sweep, cli.out_dir, command)
    print(results_section(sweep["configurations"]))
    out = Path(cli.out_dir)
    print(f"[sweep] {len(runs)} runs, {len(sweep['configurations'])} configurations, {len(sweep['left_out'])} "
          f"left out: {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'figures'}")
    if cli.grid and left_out:
        raise SystemExit(f"error: {len(left_out)} of {len(left_out) + len(runs)} runs failed (see sweep.md, Left out)")
    return sweep


if __name__ == "__main__":
    main()
