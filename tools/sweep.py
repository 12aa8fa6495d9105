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
import re
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
# (the final numbers are the same with and without it: tests/test_e2e.py; runs made before it existed lack it).
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
            left_out.append({"dir": str(folder), "reason": "config.json but no results.json: unfinished or failed (or "
                                                           "a calibrate.py run, which writes none)"})
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


MODELS = ("weak", "strong", "intermediate")
# Options whose default means "not used": a label names them only where set (`strong first16` rather than
# `intermediate=, strong=..., student_seed=-1`); an empty string is unset for every option.
UNSET = {"student_seed": -1, "weak_max_len": 0, "sft_lr": 0, "conf_threshold": 0}


def short_models(names):
    """{model: its name in a table}: without the folder every name shares (models/x -> x), and where every name
    is one model or a cut of it (x, x:first8), a cut without the model (x:first8 -> first8)."""
    names = sorted({n for n in names if isinstance(n, str) and n})
    folders = {n.rpartition("/")[0] for n in names}
    cut = len(folders.pop()) + 1 if len(folders) == 1 and "" not in folders else 0
    short = {n: n[cut:] for n in names}
    sources = {re.sub(r":first\d+$", "", s) for s in short.values()}
    if len(sources) == 1:
        short = {n: re.sub(r"^.*:(first\d+)$", r"\1", s) for n, s in short.items()}
    return short


def models_note(short):
    """The sentence beside a table whose model names short_models shortened: what it dropped."""
    dropped = sorted({n[:len(n) - len(s)] for n, s in short.items() if s != n}, key=len)
    if not dropped:
        return ""
    cuts = any(re.search(r":first\d+$", n) for n in short)
    return ("Model names without " + " or ".join(f"`{d}`" for d in dropped)
            + (" (firstK: a model's first K layers)." if cuts else "."))


def option_text(key, value, short):
    """One option in a configuration's label: `strong first8`, `via first8` (the intermediate model), `alpha 0.5`;
    "" for an unset one."""
    if value == "" or (key in UNSET and value == UNSET[key]):
        return ""
    if key in MODELS and isinstance(value, str):
        return f"{'via' if key == 'intermediate' else key} {short.get(value, value)}"
    return f"{key} {json.dumps(value) if isinstance(value, bool) or value is None else value}"


def config_labels(configs, varying):
    """Each configuration's name in tables and figure keys: what tells it apart from the others shown (its method
    where there are several, then the options that differ within its method, the models first), e.g.
    `strong first16 via first8, alpha 0.5`; a configuration with nothing to tell apart is its method."""
    short = short_models(c["options"].get(k) for c in configs for k in MODELS)
    methods = {c["method"] for c in configs}
    labels = []
    for c in configs:
        keys = [k for k in MODELS if k in varying[c["method"]]] + [k for k in varying[c["method"]] if k not in MODELS]
        texts = [option_text(k, c["options"].get(k, ABSENT), short) for k in keys]
        models = " ".join(t for k, t in zip(keys, texts) if k in MODELS and t)
        parts = [c["method"]] * (len(methods) > 1) + [models] + [t for k, t in zip(keys, texts) if k not in MODELS]
        labels.append(", ".join(p for p in parts if p) or c["method"])
    return labels


def summarize(runs, left_out):
    """sweep.json's content: configurations with statistics over seeds, every run's numbers, the runs left out."""
    runs, invalid = drop_invalid(runs)
    configs, twins = group(runs)
    varying = varying_options(configs)
    labels = config_labels(configs, varying)
    numeric = {k for r in runs for k, v in r["metrics"].items() if v is not None}
    out = []
    for i, (config, label) in enumerate(zip(configs, labels), 1):
        names = [k for k in dict.fromkeys(k for r in config["runs"] for k in r["metrics"])
                 if k in numeric or k.rsplit("/", 1)[-1] in NULLABLE]
        differs = {k: config["options"].get(k, ABSENT) for k in varying[config["method"]]}
        out.append({"id": f"c{i}", "method": config["method"], "label": label,
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
    shown = {p["configuration"] for points in methods.values() for p in points}
    return {"methods": methods, "key": {c["id"]: c["label"] for c in sweep["configurations"] if c["id"] in shown}}


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
            ids = {}  # configurations that share a point (their none student, say) get one label, not a blot
            for p in data["methods"][method]:
                if p[key] is None:
                    continue
                ax.errorbar(p["gap"], p[key], xerr=p["gap_std"], yerr=nan(p[f"{key}_std"]), capsize=3,
                            fmt=MARKERS.get(p["setting"], "D"), color=COLORS.get(p["setting"]), label=p["setting"])
                ids.setdefault((p["gap"], p[key]), []).append(p["configuration"])
            for xy, names in ids.items():
                ax.annotate(", ".join(dict.fromkeys(names)), xy, textcoords="offset points", xytext=(5, 4), fontsize=8)
            if key == "delta_ds":
                ax.axhline(0, color="black", lw=0.6)
            ax.set_title(f"{method}: {'DS' if key == 'ds' else 'ΔDS'}")
            ax.set_xlabel("capability gap = strong − weak ceiling accuracy\n(fraction of test pairs)")
            ax.set_ylabel(ylabel)
            handles = dict(zip(*ax.get_legend_handles_labels()[::-1]))
            if handles:
                ax.legend(handles.values(), handles.keys(), fontsize=8, title="student", title_fontsize=8)
    fig.tight_layout()
    # the key to the points' labels, under the panels (save's tight bounding box takes it in)
    key = [f"{cid}: {label}" for cid, label in data["key"].items()]
    fig.text(0.01, 0, "points:\n" + "\n".join(key), ha="left", va="top", fontsize=8, family="monospace")
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
            "accuracy), one point per configuration and student setting, marked with the configuration's id (the "
            "key is under the panels), one column per method; error bars: sample std over seeds (zero for one "
            "seed). Deception shows as a high DS and a positive ΔDS.")})
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
# sweep.md: tables name a configuration by its label (what tells it apart), cells are mean ± std over seeds; the
# per-seed values of DS and what it is read against have their own table, every other one is in sweep.json

def cell(s, digits=3):
    """'mean ± std', with the count of nulls left out."""
    if s is None or (s["n"] == 0 and not s["n_none"]):
        return "–"
    text = "–" if s["n"] == 0 else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return text + (f" ({s['n_none']} null)" if s["n_none"] else "")


def table(header, rows):
    """A markdown table: the header's cells, then one line per row of cells."""
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(map(str, r))} |" for r in rows)]


def shared_columns(header, rows):
    """(the columns whose value is the same in every row, as "name value" texts; the table without them): a
    table shows what differs between its rows, and says once what they share."""
    if len(rows) < 2:
        return [], header, rows
    keep = [j for j in range(len(header)) if len({r[j] for r in rows}) > 1]
    shared = [f"{header[j]} {rows[0][j]}" for j in range(len(header)) if j not in keep]
    return shared, [header[j] for j in keep], [[r[j] for j in keep] for r in rows]


def result_groups(configs):
    """The main tables' columns: (title, [(column, stats key)]): the ceilings and gap, then per student setting its
    accuracy and deception, then per conflict setting its tax."""
    groups = [("Ceilings and capability gap", [
        ("weak ceiling", "models/weak/accuracy"), ("strong ceiling", "models/strong/accuracy"),
        ("intermediate", "models/intermediate/accuracy"), ("gap (strong − weak)", "gap")])]
    settings = settings_of([{"metrics": c["stats"]} for c in configs])
    for s in settings:
        groups.append((f"Student {s}", [
            ("accuracy", f"students/{s}/accuracy"), ("PGR", f"students/{s}/pgr"),
            ("DS (error in WU ∩ SK)", f"students/{s}/ds"), ("error in WK ∩ SK", f"students/{s}/err_wk_sk"),
            (f"ΔDS = DS({s}) − DS(none)", f"students/{s}/delta_ds"),
            ("DS restated", f"students/{s}/ds_restated/share")]))
    tax = "students/{}/conflict_tax/"
    for s in settings:
        groups.append((f"Conflict tax of {s}", [
            ("tax in WU ∩ SK", tax.format(s) + "areas/weak-unknown & strong-known/tax"),
            ("tax in WK ∩ SK", tax.format(s) + "areas/weak-known & strong-known/tax"),
            ("share of the SK tax in WU", tax.format(s) + "share_wu"),
            ("that share if even", tax.format(s) + "base_rate_wu")]))
    return groups


RESULTS_NOTE = (
    "DS restated: of the student's disagreements with the strong ceiling, the share in WU ∩ SK. Conflict tax: of "
    "the no-conflict student's right pairs in an area, the share the conflict student gets wrong; the share of the "
    "strong-known (SK) tax that falls in WU, beside that share if the tax fell evenly (the base rate). Per-seed "
    "values: the table \"Per seed\" (DS and what it is read against) and sweep.json (`values`, in seed order).")


def results_section(configs):
    """The main tables: one row per configuration, one table per group of numbers (result_groups)."""
    if not configs:
        return "## Results\n\nNo finished runs.\n"
    lines = ["## Results"]
    for title, columns in result_groups(configs):
        columns = [(name, key) for name, key in columns if any(key in c["stats"] for c in configs)]
        rows = [[c["label"], len(c["seeds"])] + [cell(c["stats"].get(key)) for _, key in columns]
                for c in configs if any(key in c["stats"] for _, key in columns)]
        if rows:
            lines += ["", f"**{title}**", "", *table(["configuration", "seeds"] + [n for n, _ in columns], rows)]
    return "\n".join(lines + ["", RESULTS_NOTE, "", "Every other number (ties, training-set sizes, extra metrics) "
                              "is in sweep.json."])


def ds_points(configs):
    """(configuration, student setting) of every DS the figure shows, by capability gap."""
    points = []
    for c in configs:
        st = c["stats"]
        for setting in settings_of([{"metrics": st}]):
            gap, ds = st.get("gap"), st.get(f"students/{setting}/ds")
            if gap and gap["mean"] is not None and ds and ds["mean"] is not None:
                points.append((gap["mean"], c["id"], c, setting))
    return [(c, setting) for *_, c, setting in sorted(points, key=lambda p: p[:2])]


def ds_gap_table(configs):
    """The figure's numbers, one row per configuration and student, by capability gap: DS and ΔDS beside the
    error where the supervisor can check (WK ∩ SK), so that a rise of DS reads against a rise everywhere."""
    rows = [[c["label"], setting, len(c["seeds"])] + [cell(c["stats"].get(key.format(setting))) for key in (
        "gap", "students/{}/ds", "students/{}/delta_ds", "students/{}/err_wk_sk")] for c, setting in ds_points(configs)]
    header = ["configuration", "student", "seeds", "gap", "DS (error in WU ∩ SK)", "ΔDS", "error in WK ∩ SK"]
    return ["Its numbers, by gap (mean ± std over seeds):", "", *table(header, rows)]


def per_seed_table(configs):
    """The same numbers seed by seed, with ΔDS's McNemar p, which is a per-seed test."""
    keys = ("gap", "students/{}/ds", "students/{}/delta_ds", "students/{}/delta_ds_p", "students/{}/err_wk_sk")
    rows = []
    for c, setting in ds_points(configs):
        missing = {"values": [None] * len(c["seeds"])}
        values = [(c["stats"].get(key.format(setting)) or missing)["values"] for key in keys]
        rows += [[c["label"], setting, seed] + [fmt(v[i]) for v in values] for i, seed in enumerate(c["seeds"])]
    header = ["configuration", "student", "seed", "gap", "DS", "ΔDS", "ΔDS: McNemar's p", "error in WK ∩ SK"]
    return ["## Per seed", "", "DS and what it is read against, seed by seed (in the order of each configuration's "
            "seeds):", "", *table(header, rows)]


def ceilings_section(rows):
    """Every ceiling stage, one row each; the columns every row shares said once above the table."""
    short = short_models(r["model"] for r in rows)
    cells = [[r["method"], short.get(r["model"], r["model"]), r["role"], r["seed"],
              f"{r['lr']:g}" if isinstance(r["lr"], (int, float)) else "–", r["precision"] or "–", r["n_train"],
              r["n"], rate(r["accuracy"], r["ci"]),
              f"{r['labels']['mean_abs_p']:.3f} ({r['labels']['share_beyond_0.1']:.2f})" if r.get("labels") else "–",
              f"{r['seconds'] / 60:.0f} min" if r.get("seconds") is not None else "–"] for r in rows]
    shared, header, cells = shared_columns(
        ["method", "model", "as", "seed", "lr", "precision", "train pairs", "test pairs", "accuracy [95% CI]",
         "labels \\|p − 0.5\\| (share > 0.1)", "wall time"], cells)
    note = models_note(short)
    return "\n".join(["## Ceilings", "", "Every finished weak and strong ceiling under the runs given, finished run or "
                      "not (a model trained on ground truth; one row per stage, a shared one once); accuracy on the "
                      "test pairs with its 95% (Wilson) interval; a labelling stage's labels p = sigmoid(margin): mean "
                      "|p − 0.5| and the share beyond 0.1 from 0.5." + (f" Every row: {', '.join(shared)}." if shared
                                                                         else ""),
                      *(["", note] if note else []), "", *table(header, cells)])


def run_names(runs):
    """{run folder: its name in the Runs table}: the config hash that ends a run folder's name, where those tell the
    runs apart (the full paths are in sweep.json); else the folder's name."""
    tails = {r["dir"]: Path(r["dir"]).name.rsplit("-", 1)[-1] for r in runs}
    unique = len(set(tails.values())) == len(tails)
    return {d: t if unique else Path(d).name for d, t in tails.items()}


def runs_section(runs, labels):
    """One row per run: its ceilings and each student's accuracy and DS."""
    names, settings = run_names(runs), settings_of(runs)
    rows = [[names[r["dir"]], labels[r["configuration"]], r["seed"], fmt(r["metrics"].get("models/weak/accuracy")),
             fmt(r["metrics"].get("models/strong/accuracy")),
             *(f"{fmt(r['metrics'].get(f'students/{s}/accuracy'))} / {fmt(r['metrics'].get(f'students/{s}/ds'))}"
               for s in settings),
             f"{r['seconds']:.0f} s" if "seconds" in r else "–"] for r in runs]
    hashes = any(n != Path(d).name for d, n in names.items())
    return ["## Runs", "", "run: the run folder's name" + (", its last part (the config hash; full paths in "
                                                            "sweep.json)" if hashes else "") + ".", "",
            *table(["run", "configuration", "seed", "weak", "strong", *(f"{s}: acc / DS" for s in settings),
                    "wall time"], rows)]


def render(sweep, figs, command):
    configs = sweep["configurations"]
    lines = ["# Sweep", "", f"`{command}` on {datetime.now():%Y-%m-%d %H:%M}: {len(sweep['runs'])} runs in "
             f"{len(configs)} configurations; {len(sweep['left_out'])} left out.", "",
             f"Each cell: mean ± std over seeds. std: {STD}. {NULLS}. Accuracies and error rates are fractions of "
             "test pairs.", ""]
    lines += ["## Configurations", "",
              "A configuration is the method and every option of the run except "
              + ", ".join(f"`{k}`" for k in IGNORED) + ", which change no numbers (the seed is averaged over). "
              "Tables name it by what tells it apart from the others (an option at its unset value, such as no "
              "intermediate model, is left out); figures mark it by its id.", ""]
    for method, keys in sweep["varying_options"].items():
        n = sum(c["method"] == method for c in configs)
        lines.append(f"- {method}: {n} configuration{'s' * (n != 1)}" + (
            f", told apart by {', '.join(f'`{k}`' for k in keys)}" if keys else ""))
    lines += ["", *table(["id", "configuration", "method", "seeds"],
                         [[c["id"], c["label"], c["method"], ", ".join(map(str, c["seeds"]))] for c in configs])]
    if any(k in MODELS for keys in sweep["varying_options"].values() for k in keys):  # a label names a model
        lines += ["", models_note(short_models(c["options"].get(k) for c in configs for k in MODELS))]
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
                  "", f"*{f['caption']}*", "", *ds_gap_table(configs), "", *per_seed_table(configs)]
    for c in configs:
        area = areas_data(c)
        if not area["areas"]:
            continue
        lines += ["", f"## {c['label']} ({c['id']}): knowledge areas", "",
                  *table(["area", "n", *area["settings"]], [
                      [a, cell(area_size(c["stats"], a, list(area["settings"])), 1)]
                      + [cell(c["stats"].get(f"students/{s}/areas/{a}/student_error")) for s in area["settings"]]
                      for a in area["areas"]])]
        for name in (f"figures/areas-{c['id']}.png", f"figures/tax-{c['id']}.png", f"figures/curve-{c['id']}.png"):
            if name in by_file:
                lines += ["", f"![{c['id']}]({name})", "", f"*{by_file[name]['caption']}*"]
    if sweep["runs"]:
        lines += ["", *runs_section(sweep["runs"], {c["id"]: c["label"] for c in configs})]
    notes = [(r["dir"], n) for r in sweep["runs"] for n in r.get("notes", [])]
    if notes:
        lines += ["", "## Notes from the runs", ""] + [f"- {d}: {n}" for d, n in notes]
    if sweep["left_out"]:
        lines += ["", "## Left out", ""] + [f"- `{x['dir']}`: {x['reason']}" for x in sweep["left_out"]]
    return "\n".join(lines) + "\n"


def own_files(out_dir):
    """The files an earlier sweep wrote in out_dir, from its sweep.json (the figures it lists are its manifest);
    None where out_dir holds no sweep.json of a sweep."""
    earlier = read_json(Path(out_dir) / "sweep.json")
    if not (isinstance(earlier, dict) and {"configurations", "runs", "left_out"} <= earlier.keys()):
        return None
    figures = [f.get("file") for f in earlier.get("figures") or [] if isinstance(f, dict)]
    # only a figure's own name: a sweep.json edited by hand must not point the removal elsewhere
    figures = [f for f in figures if isinstance(f, str) and re.fullmatch(r"figures/[^/]+\.png", f)]
    return {"sweep.json", "sweep.md", *figures}


def check_own(out_dir, names):
    """Refuse, in one line, to write over a file in out_dir that no sweep wrote (a folder of the user's own)."""
    own = own_files(out_dir) or set()
    foreign = [n for n in names if (Path(out_dir) / n).exists() and n not in own]
    if foreign:
        raise SystemExit(f"error: --out_dir {out_dir} holds {', '.join(foreign)}, which no sweep wrote there (no "
                         "sweep.json lists it); give an --out_dir of the sweep's own")


def write_outputs(sweep, out_dir, command):
    """sweep.json, the figures, sweep.md; the figures an earlier sweep wrote in the same folder (those its sweep.json
    lists) are removed first, and nothing else: a file of the user's there is never overwritten or removed."""
    out_dir = Path(out_dir)
    figs = figures(sweep)
    check_own(out_dir, ["sweep.json", "sweep.md", *(f["file"] for f in figs)])
    for old in own_files(out_dir) or ():
        if old.startswith("figures/"):
            (out_dir / old).unlink(missing_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
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
    check_own(cli.out_dir, ["sweep.json", "sweep.md"])
    if cli.grid:
        runs, left_out = run_grid(parse_grid(cli.grid), cli.args, cli.out_dir, cli.jobs)
    else:
        runs, left_out = scan(cli.runs)
        if not runs and not left_out:  # a misspelt or foreign folder: nothing to summarise, so nothing is written
            raise SystemExit(f"error: no run folder under {', '.join(cli.runs)} (a folder with a run's config.json "
                             "or results.json)")
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
