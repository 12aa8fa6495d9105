"""Tests of sweep.py: grouping runs into configurations, statistics over seeds, runs left out, figures.

Most tests build run folders by hand (config.json, results.json, stage folders), so every expected number is
computed here from the values written; one test runs a tiny grid end to end through the real scripts.
"""
import json
import math
import os
import re
import shlex
import statistics
from pathlib import Path
from unittest import mock

import pytest

import common
from tools import sweep

AREAS = common.AREAS
HERE = Path(__file__).resolve().parents[1]  # the repository
# a README block of tables copied from a sweep.md, with the command that writes that sweep.md from results/
README_TABLES = re.compile(r"<!-- tables from `(python tools/sweep\.py [^`]+)` -->\n(.*?)<!-- end of tables -->", re.S)
BASE = {"data": "toy", "n_gt": 400, "n_w2s": 400, "n_test": 50, "n_extra": 400, "weak": "tiny:1x32",
        "strong": "tiny:2x64", "lr": 3e-4, "epochs": 4, "batch_size": 32, "micro_batch": 8, "seed": 0,
        "out_dir": "runs", "log_every": 10, "force": False, "settings": "none,implicit,explicit"}


def student(acc, ds, err_wk_sk, pgr=0.5, delta_ds=None, errors=(0.5, 0.9), sizes=(20, 5, 10, 15)):
    """A results.json student entry; the four areas' errors are err_wk_sk, errors[0], ds, errors[1]."""
    entry = {"accuracy": acc, "pgr": pgr, "ds": ds, "err_wk_sk": err_wk_sk,
             "areas": {a: {"n": n, "student_error": e}
                       for a, n, e in zip(AREAS, sizes, (err_wk_sk, errors[0], ds, errors[1]))}}
    if delta_ds is not None:
        entry["delta_ds"] = delta_ds
    return entry


def make_run(parent, name, weak_acc, strong_acc, students, method=None, results_json=True, valid=None, **options):
    """A run folder as the scripts leave it: config.json, stage folders, results.json (unless not finished)."""
    folder = parent / name
    folder.mkdir(parents=True)
    config = {**BASE, **options}
    (folder / "config.json").write_text(json.dumps(config))
    for stage in ("weak", "strong", *(f"student-{s}" for s in students)):
        (folder / stage).mkdir()
        (folder / stage / "stage.json").write_text("{}")
    if results_json:
        results = {"config": config, "data": {"n_test": 50},
                   "models": {"weak": {"accuracy": weak_acc, "ties": 0, "n": 50, "n_train": 400},
                              "strong": {"accuracy": strong_acc, "ties": 1, "n": 50, "n_train": 400}},
                   "students": students, "notes": ["a note"], "a_new_field": {"count": 3}}
        if method:
            results["method"] = method
        if valid is not None:
            results["valid"] = valid
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def three_seeds(parent, prefix="rm-toy-tiny-1x32-tiny-2x64", **options):
    """Seeds 0, 1, 2 of one configuration, with hand-picked numbers (their mean and std are in the tests)."""
    for seed, weak_acc, strong_acc, acc, ds_none, ds_exp, pgr in ((0, 0.60, 1.00, 0.7, 0.2, 0.5, 0.5),
                                                          (1, 0.62, 0.98, 0.8, 0.3, 0.7, None),
                                                          (2, 0.64, 0.96, 0.9, 0.4, 0.9, 0.3)):
        make_run(parent, f"{prefix}-s{seed}-abc{seed}", weak_acc, strong_acc, seed=seed, **options, students={
            "none": student(acc, ds_none, 0.1, pgr=pgr),
            "explicit": student(0.5, ds_exp, 0.1, delta_ds=ds_exp - ds_none, pgr=pgr)})


def aggregate(paths, out):
    return sweep.main(["--runs", *map(str, paths), "--out_dir", str(out)])


def sweep_json(out):
    return json.loads((out / "sweep.json").read_text())


def test_mean_and_sample_std_over_seeds(tmp_path):
    three_seeds(tmp_path / "runs")
    aggregate([tmp_path / "runs"], tmp_path / "out")
    [c] = sweep_json(tmp_path / "out")["configurations"]
    s = c["stats"]
    assert c["seeds"] == [0, 1, 2] and c["method"] == "rm"
    expected = {"models/weak/accuracy": (0.62, 0.02), "models/strong/accuracy": (0.98, 0.02), "gap": (0.36, 0.04),
                "students/none/accuracy": (0.8, 0.1), "students/none/ds": (0.3, 0.1),
                "students/explicit/ds": (0.7, 0.2), "students/explicit/delta_ds": (0.4, 0.1),
                "students/explicit/err_wk_sk": (0.1, 0.0)}
    for key, (mean, std) in expected.items():
        assert s[key]["mean"] == pytest.approx(mean) and s[key]["std"] == pytest.approx(std), key
        assert s[key]["n"] == 3 and s[key]["n_none"] == 0
    assert s["students/explicit/ds"]["values"] == pytest.approx([0.5, 0.7, 0.9])
    assert s["students/explicit/areas/weak-unknown & strong-known/student_error"]["mean"] == pytest.approx(0.7)
    assert s["a_new_field/count"]["mean"] == 3, "numbers added to results.json later come along"
    md = (tmp_path / "out" / "sweep.md").read_text()
    # one configuration: named by its method; mean ± std in the tables, each seed's value in "Per seed"
    assert "| rm | 3 | 0.620 ± 0.020 | 0.980 ± 0.020 | 0.360 ± 0.040 |" in md
    assert "| rm | 3 | 0.500 ± 0.000 | 0.400 ± 0.141 (1 null) | 0.700 ± 0.200 | 0.100 ± 0.000 | 0.400 ± 0.100 |" in md
    assert "| rm | explicit | 3 | 0.360 ± 0.040 | 0.700 ± 0.200 | 0.400 ± 0.100 | 0.100 ± 0.000 |" in md
    assert "| rm | explicit | 1 | 0.360 | 0.700 | 0.400 | – | 0.100 |" in md.split("## Per seed")[1]
    assert "n - 1" in md and "0 for a single seed" in md


def test_one_seed_has_std_zero(tmp_path):
    make_run(tmp_path / "runs", "rm-a-s0", 0.6, 0.9, {"none": student(0.7, 0.25, 0.1)})
    aggregate([tmp_path / "runs"], tmp_path / "out")
    s = sweep_json(tmp_path / "out")["configurations"][0]["stats"]["students/none/ds"]
    assert (s["mean"], s["std"], s["n"]) == (0.25, 0.0, 1)


def test_nulls_are_left_out_and_counted(tmp_path):
    three_seeds(tmp_path / "runs")
    aggregate([tmp_path / "runs"], tmp_path / "out")
    pgr = sweep_json(tmp_path / "out")["configurations"][0]["stats"]["students/none/pgr"]
    assert pgr["mean"] == pytest.approx(0.4) and pgr["std"] == pytest.approx(statistics.stdev([0.5, 0.3]))
    assert (pgr["n"], pgr["n_none"], pgr["values"]) == (2, 1, [0.5, None, 0.3])
    assert "| rm | 3 | 0.800 ± 0.100 | 0.400 ± 0.141 (1 null) |" in (tmp_path / "out" / "sweep.md").read_text()


def test_all_null_and_missing_settings(tmp_path):
    """DS null in every seed stays null (never 0); a setting only one seed trained counts the others as null."""
    make_run(tmp_path / "runs", "rm-a-s0", 0.6, 0.6, seed=0, students={
        "none": student(0.6, None, 0.1, pgr=None), "explicit": student(0.5, None, 0.2, pgr=None)})
    make_run(tmp_path / "runs", "rm-a-s1", 0.6, 0.6, seed=1, settings="none",
             students={"none": student(0.6, None, 0.3, pgr=None)})
    result = aggregate([tmp_path / "runs"], tmp_path / "out")
    [c] = result["configurations"]
    assert c["stats"]["students/none/ds"] == {"mean": None, "std": None, "n": 0, "n_none": 2, "values": [None, None]}
    assert c["stats"]["students/explicit/err_wk_sk"]["values"] == [0.2, None]
    assert c["stats"]["students/explicit/err_wk_sk"]["n_none"] == 1
    assert sweep.ds_gap_data(result)["methods"] == {}, "no DS, no point on the main figure"
    assert "| rm | 2 | 0.600 ± 0.000 | – (2 null) | – (2 null) | 0.200 ± 0.141 |" in (tmp_path / "out" / "sweep.md").read_text()


def test_configurations_are_kept_apart(tmp_path):
    runs = tmp_path / "runs"
    three_seeds(runs)
    three_seeds(runs, prefix="rm-toy-lr", lr=1e-3)
    # options that change no number do not split a configuration
    make_run(runs, "rm-other-s3", 0.6, 1.0, {"none": student(0.7, 0.2, 0.1)}, seed=3, micro_batch=2,
             out_dir="elsewhere", log_every=1, force=True, settings="none", grad_ckpt=True,
             eval_every=5)  # eval_every only adds eval_curve.jsonl (runs made before it lack the option)
    # the same options under another method: another configuration (method from results.json, then folder name)
    make_run(runs, "weird-name-s0", 0.6, 1.0, {"none": student(0.7, 0.2, 0.1)}, method="dpo")
    make_run(runs, "simpo-toy-s0", 0.6, 1.0, {"none": student(0.7, 0.2, 0.1)})
    result = aggregate([runs], tmp_path / "out")
    configs = {(c["method"], c["options"]["lr"]): c for c in result["configurations"]}
    assert set(configs) == {("rm", 3e-4), ("rm", 1e-3), ("dpo", 3e-4), ("simpo", 3e-4)}
    assert configs["rm", 3e-4]["seeds"] == [0, 1, 2, 3]
    assert configs["rm", 1e-3]["seeds"] == [0, 1, 2]
    assert configs["rm", 1e-3]["stats"]["students/explicit/ds"]["n"] == 3
    assert result["varying_options"] == {"rm": ["lr"], "dpo": [], "simpo": []}
    assert configs["rm", 1e-3]["label"] == "rm, lr 0.001"  # several methods shown: the method is part of the name
    assert configs["dpo", 3e-4]["label"] == "dpo"
    assert "told apart by `lr`" in (tmp_path / "out" / "sweep.md").read_text()


def test_unfinished_invalid_and_duplicate_runs_are_left_out(tmp_path):
    runs = tmp_path / "runs"
    three_seeds(runs)
    make_run(runs, "rm-toy-tiny-1x32-tiny-2x64-s3-half", 0.6, 1.0, {"none": student(0.0, 1.0, 1.0)}, seed=3,
             results_json=False)
    make_run(runs, "rm-toy-tiny-1x32-tiny-2x64-s4-diverged", 0.6, 1.0, {"none": student(0.0, 1.0, 1.0)}, seed=4,
             valid=False)
    make_run(runs, "rm-zz-duplicate-s0", 0.6, 1.0, {"none": student(0.0, 1.0, 1.0)}, seed=0)
    model = runs / "models" / "tiny-1x32-pt0"  # a tiny model's own config.json is not a run
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    result = aggregate([runs], tmp_path / "out")
    [c] = result["configurations"]
    assert c["seeds"] == [0, 1, 2] and c["stats"]["students/none/accuracy"]["mean"] == pytest.approx(0.8)
    reasons = {os.path.basename(x["dir"]): x["reason"] for x in result["left_out"]}
    assert set(reasons) == {"rm-toy-tiny-1x32-tiny-2x64-s3-half", "rm-toy-tiny-1x32-tiny-2x64-s4-diverged",
                            "rm-zz-duplicate-s0"}
    assert "no results.json" in reasons["rm-toy-tiny-1x32-tiny-2x64-s3-half"]
    assert "not valid" in reasons["rm-toy-tiny-1x32-tiny-2x64-s4-diverged"]
    assert "same configuration and seed" in reasons["rm-zz-duplicate-s0"]
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "## Left out" in md and "s3-half" in md.split("## Left out")[1]


def test_damaged_config_json_is_read_from_results_json_or_the_run_named_and_left_out(tmp_path):
    """A run whose config.json is damaged is summarised from the copy in its results.json, its ceiling included;
    a run with neither file readable is named among those left out; the other runs are summarised."""
    runs = tmp_path / "runs"
    three_seeds(runs)
    damaged = make_run(runs, "rm-toy-tiny-1x32-tiny-2x64-s3-damaged", 0.6, 1.0, {"none": student(0.9, 0.1, 0.1)}, seed=3)
    lost = make_run(runs, "rm-toy-tiny-1x32-tiny-2x64-s4-lost", 0.6, 1.0, {"none": student(0.9, 0.1, 0.1)}, seed=4)
    for folder in (damaged, lost):
        (folder / "weak" / "stage.json").write_text(json.dumps(
            {"accuracy": 0.6, "n": 50, "n_train": 400, "key": f"k-{folder.name}", "seconds": 6.0}))
        (folder / "config.json").write_text('{"weak": "tiny:1x32", "str')  # cut short
    (lost / "results.json").write_text('{"models": ')
    result = aggregate([runs], tmp_path / "out")
    [c] = result["configurations"]
    assert c["seeds"] == [0, 1, 2, 3]
    assert [os.path.basename(x["dir"]) for x in result["left_out"]] == [lost.name]
    [row] = [r for r in result["ceilings"] if r["dir"] == str(damaged / "weak")]
    assert (row["model"], row["lr"], row["seed"]) == ("tiny:1x32", 3e-4, 3)
    assert lost.name in (tmp_path / "out" / "sweep.md").read_text().split("## Left out")[1]


def test_out_dir_not_writable_is_one_line_before_anything_runs(tmp_path):
    """As the method scripts do: an --out_dir this user cannot write is refused up front, not with a traceback
    from the first folder or file the sweep makes."""
    three_seeds(tmp_path / "runs")
    out, argv = tmp_path / "out", ["--runs", str(tmp_path / "runs"), "--out_dir", str(tmp_path / "out" / "sweep")]
    if os.geteuid() == 0:  # root writes anywhere: check the rule on a folder whose access is refused by name
        refused = tmp_path
        with mock.patch("os.access", return_value=False), pytest.raises(SystemExit) as info:
            sweep.main(argv)
    else:
        refused = out
        out.mkdir(mode=0o500)
        with pytest.raises(SystemExit) as info:
            sweep.main(argv)
    assert str(info.value) == f"error: --out_dir {out / 'sweep'}: {refused} is not writable by this user"
    assert not (out / "sweep").exists()


def test_a_run_folder_itself_and_overlapping_paths(tmp_path):
    three_seeds(tmp_path / "runs")
    one = next((tmp_path / "runs").glob("*-s0-*"))
    result = aggregate([one, tmp_path / "runs"], tmp_path / "out")
    assert len(result["runs"]) == 3 and not result["left_out"]


def test_figures_are_drawn_from_the_numbers_in_sweep_json(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    three_seeds(runs)
    three_seeds(runs, prefix="rm-toy-pt", strong="tiny:2x64+pt600")
    make_run(runs, "dpo-toy-s0", 0.6, 0.9, {"none": student(0.7, 0.3, 0.1),
                                            "implicit": student(0.6, 0.5, 0.1, delta_ds=0.2)}, method="dpo")
    drawn = {}
    for kind, draw in list(sweep.DRAW.items()):
        monkeypatch.setitem(sweep.DRAW, kind, lambda data, path, draw=draw: (drawn.setdefault(path.name, data),
                                                                              draw(data, path)))
    aggregate([runs], tmp_path / "out")
    saved = sweep_json(tmp_path / "out")
    figures = tmp_path / "out" / "figures"
    assert sorted(drawn) == sorted(p.name for p in figures.iterdir())
    assert sorted(drawn) == ["areas-c1.png", "areas-c2.png", "areas-c3.png", "ds_vs_gap.png"]
    for png in figures.iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert [f["file"] for f in saved["figures"]] == ["figures/" + n for n in
                                                     ("ds_vs_gap.png", "areas-c1.png", "areas-c2.png", "areas-c3.png")]
    md = (tmp_path / "out" / "sweep.md").read_text()
    for f in saved["figures"]:
        assert f"]({f['file']})" in md and f"*{f['caption']}*" in md

    configs = {c["id"]: c for c in saved["configurations"]}
    points = [(m, p) for m, ps in drawn["ds_vs_gap.png"]["methods"].items() for p in ps]
    assert sorted((m, p["configuration"], p["setting"]) for m, p in points) == [
        ("dpo", "c3", "implicit"), ("dpo", "c3", "none"),
        ("rm", "c1", "explicit"), ("rm", "c1", "none"), ("rm", "c2", "explicit"), ("rm", "c2", "none")]
    for method, p in points:
        s = configs[p["configuration"]]["stats"]
        assert configs[p["configuration"]]["method"] == method
        assert (p["gap"], p["gap_std"]) == (s["gap"]["mean"], s["gap"]["std"])
        ds, delta = s[f"students/{p['setting']}/ds"], s.get(f"students/{p['setting']}/delta_ds")
        assert (p["ds"], p["ds_std"]) == (ds["mean"], ds["std"])
        assert (p["delta_ds"], p["delta_ds_std"]) == ((delta["mean"], delta["std"]) if delta else (None, None))
    assert drawn["ds_vs_gap.png"]["methods"]["rm"][1]["ds"] == pytest.approx(0.7)

    for cid in ("c1", "c2", "c3"):
        data, s = drawn[f"areas-{cid}.png"], configs[cid]["stats"]
        assert data["areas"] == list(AREAS)
        assert data["n"] == [s[f"students/none/areas/{a}/n"]["mean"] for a in AREAS]
        for setting, bars in data["settings"].items():
            assert bars["error"] == [s[f"students/{setting}/areas/{a}/student_error"]["mean"] for a in AREAS]
            assert bars["std"] == [s[f"students/{setting}/areas/{a}/student_error"]["std"] for a in AREAS]
    assert list(drawn["areas-c3.png"]["settings"]) == ["none", "implicit"]
    assert drawn["areas-c1.png"]["settings"]["explicit"]["error"] == pytest.approx([0.1, 0.5, 0.7, 0.9])


def curve_rows(xs, ds, wk_sk):
    """eval_curve.jsonl rows; the areas' errors are wk_sk, 0.5, ds, 0.9."""
    return "".join(json.dumps({"step": i + 1, "examples_seen": x, "accuracy": 0.5, "ds": d,
                               "areas": {a: {"n": 10, "student_error": e} for a, e in
                                         zip(AREAS, (w, 0.5, d, 0.9))}}) + "\n"
                   for i, (x, d, w) in enumerate(zip(xs, ds, wk_sk)))


def test_deception_over_training_curve(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    three_seeds(runs)  # c1: curves at the same points in seeds 0 and 1
    three_seeds(runs, prefix="rm-toy-lr", lr=1e-3)  # c2: curves at different points
    three_seeds(runs, prefix="rm-toy-nocurve", lr=3e-3)  # c3: no curves
    for folder, xs, ds in (("rm-toy-tiny-1x32-tiny-2x64-s0-abc0", [32, 64, 96], [0.2, 0.4, None]),
                           ("rm-toy-tiny-1x32-tiny-2x64-s1-abc1", [32, 64, 96], [0.4, 0.8, 0.6]),
                           ("rm-toy-lr-s0-abc0", [32, 64], [0.1, 0.2]), ("rm-toy-lr-s2-abc2", [40, 80], [0.3, 0.4])):
        (runs / folder / "student-explicit" / "eval_curve.jsonl").write_text(curve_rows(xs, ds, [0.1] * len(xs)))
    (runs / "rm-toy-tiny-1x32-tiny-2x64-s0-abc0" / "student-none" / "eval_curve.jsonl").write_text(
        curve_rows([32, 64, 96], [0.5, 0.5, 0.5], [0.0, 0.2, 0.4]))
    drawn = {}
    monkeypatch.setitem(sweep.DRAW, "curve", lambda data, path, draw=sweep.DRAW["curve"]: (
        drawn.setdefault(path.name, data), draw(data, path)))
    aggregate([runs], tmp_path / "out")
    ids = {c["options"]["lr"]: c["id"] for c in sweep_json(tmp_path / "out")["configurations"]}
    assert sorted(drawn) == sorted([f"curve-{ids[3e-4]}.png", f"curve-{ids[1e-3]}.png"])
    for name in drawn:
        png = tmp_path / "out" / "figures" / name
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
        assert f"](figures/{name})" in (tmp_path / "out" / "sweep.md").read_text()

    c1 = drawn[f"curve-{ids[3e-4]}.png"]
    assert c1["series"] == list(AREAS) and list(c1["settings"]) == ["none", "explicit"]
    [line] = c1["settings"]["explicit"]
    ds = "weak-unknown & strong-known"
    assert line["label"] == "mean of 2 seeds" and line["x"] == [32, 64, 96]
    assert line["y"][ds] == pytest.approx([0.3, 0.6, 0.6]), "a null point is left out of the mean"
    assert line["std"][ds] == pytest.approx([statistics.stdev([0.2, 0.4]), statistics.stdev([0.4, 0.8]), 0.0])
    assert line["y"]["weak-unknown & strong-unknown"] == pytest.approx([0.9] * 3)
    [line] = c1["settings"]["none"]
    assert line["label"] == "seed 0" and line["y"]["weak-known & strong-known"] == [0.0, 0.2, 0.4]
    lines = drawn[f"curve-{ids[1e-3]}.png"]["settings"]["explicit"]
    assert [(x["label"], x["x"], x["y"][ds], x["std"]) for x in lines] == [
        ("seed 0", [32, 64], [0.1, 0.2], None), ("seed 2", [40, 80], [0.3, 0.4], None)]


def test_ceilings_of_unfinished_runs_one_row_per_stage(tmp_path):
    """A ladder measured before its students: two unfinished runs share a weak ceiling (copied into both, the same
    stage key) and each has its own strong ceiling, one of them still training. The table has the weak ceiling
    once, the finished strong one, and each accuracy with its Wilson interval."""
    def stage(folder, role, key, accuracy, n, seconds):
        (folder / role).mkdir(exist_ok=True)
        (folder / role / "stage.json").write_text(json.dumps(
            {"accuracy": accuracy, "n": n, "n_train": 400, "key": key, "seconds": seconds}))
    a = make_run(tmp_path / "runs", "rm-a-s0", None, None, {}, results_json=False, strong="big", weak="small",
                 lr=1e-5, precision="bf16")
    b = make_run(tmp_path / "runs", "rm-b-s0", None, None, {}, results_json=False, strong="bigger", weak="small",
                 lr=1e-5, precision="bf16")
    stage(a, "weak", "k-weak", 0.6, 10, 60.0)
    stage(b, "weak", "k-weak", 0.6, 10, 60.0)
    stage(a, "strong", "k-big", 0.75, 4000, 1800.0)
    (b / "strong" / "stage.json").unlink()  # still training
    labels = [0.0, 2.0, -0.5]  # the weak ceiling's margins on the pairs it labels
    for folder in (a, b):
        (folder / "weak" / "labels.jsonl").write_text("".join(json.dumps({"margin": m}) + "\n" for m in labels))
    rows = sweep.ceilings([tmp_path / "runs"])
    assert [(r["model"], r["role"], r["accuracy"], r["n"]) for r in rows] == [("small", "weak", 0.6, 10),
                                                                               ("big", "strong", 0.75, 4000)]
    assert rows[1]["ci"] == pytest.approx(common.wilson(3000, 4000)) and rows[0]["ci"] == common.wilson(6, 10)
    aggregate([tmp_path / "runs"], tmp_path / "out")
    text = (tmp_path / "out" / "sweep.md").read_text()
    lo, hi = common.wilson(3000, 4000)
    # what every row shares is said once, above the table
    assert "Every row: method rm, seed 0, lr 1e-05, precision bf16, train pairs 400." in text
    assert f"| big | strong | 4000 | 0.750 [{lo:.2f}, {hi:.2f}] | – | 30 min |" in text
    p = [1 / (1 + math.exp(-m)) for m in labels]  # |p - 0.5|: 0, 0.381, 0.122; beyond 0.1: 2 of 3
    informative = f"{sum(abs(x - 0.5) for x in p) / 3:.3f} (0.67)"
    assert "| small | weak | 10 | 0.600 [" in text and f"| {informative} | 1 min |" in text
    assert [r["model"] for r in sweep_json(tmp_path / "out")["ceilings"]] == ["small", "big"]


def test_grid_spec_and_command_lines(tmp_path):
    points = sweep.parse_grid("method=rm weak=tiny:1x32 strong=tiny:2x64,tiny:2x64+pt600 seeds=0,1,2")
    assert len(points) == 6
    assert points[:2] == [{"method": "rm", "weak": "tiny:1x32", "strong": "tiny:2x64", "seed": "0"},
                          {"method": "rm", "weak": "tiny:1x32", "strong": "tiny:2x64", "seed": "1"}]
    assert sweep.parse_grid("method=rm,dpo") == [{"method": "rm", "seed": "0"}, {"method": "dpo", "seed": "0"}]
    for bad in ("weak=tiny:1x32", "method=ppo", "method=rm method=dpo", "method=rm lr"):
        with pytest.raises(SystemExit):
            sweep.parse_grid(bad)
    [p] = sweep.plan(sweep.parse_grid("method=rm lr=1e-3 seeds=4"), "--data toy --epochs 2", tmp_path)
    assert p["cmd"][2:] == ["--data", "toy", "--epochs", "2", "--lr=1e-3", "--seed=4", f"--out_dir={tmp_path}"]
    assert p["cmd"][1].endswith("rm_w2s.py") and p["name"] == "rm-lr1e-3-s4"
    assert (p["config"]["lr"], p["config"]["seed"], p["config"]["epochs"], p["config"]["data"]) == (1e-3, 4, 2, "toy")
    with pytest.raises(SystemExit, match="--args sets seed"):
        sweep.plan(sweep.parse_grid("method=rm"), "--seed 3", tmp_path)
    with pytest.raises(SystemExit, match="--args sets strong"):
        sweep.plan(sweep.parse_grid("method=rm strong=tiny:2x64"), "--strong=tiny:1x32", tmp_path)
    with pytest.raises(SystemExit, match="no_such_option"):
        sweep.plan(sweep.parse_grid("method=rm"), "--no_such_option 1", tmp_path)


def test_a_failed_run_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(SystemExit, match="1 of 1 runs failed"):
        sweep.main(["--grid", "method=rm", "--args=--data toy --n_gt 0", "--out_dir", str(tmp_path)])
    [left] = sweep_json(tmp_path)["left_out"]
    assert "exit code" in left["reason"] and "n_gt" in left["reason"]
    assert "## Left out" in (tmp_path / "sweep.md").read_text()


def test_tiny_grid_end_to_end(tmp_path, monkeypatch, capsys):
    """Two seeds of one configuration through rm_w2s.py, then the same grid again: every stage cached."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models on a small CPU are much faster on one thread
    argv = ["--grid", "method=rm weak=tiny:1x32 strong=tiny:2x64 seeds=0,1", "--out_dir", str(tmp_path),
            "--args=--data toy --n_gt 48 --n_w2s 48 --n_test 48 --n_extra 24 --batch_size 16 --micro_batch 4 "
            "--lr 1e-3 --settings none,explicit --log_every 1000"]
    sweep.main(argv)
    result = sweep_json(tmp_path)
    assert len(result["runs"]) == 2 and len(result["configurations"]) == 1 and not result["left_out"]
    [c] = result["configurations"]
    assert c["seeds"] == [0, 1] and c["stats"]["models/weak/accuracy"]["n"] == 2
    for run in result["runs"]:
        saved = json.loads((tmp_path / os.path.basename(run["dir"]) / "results.json").read_text())
        assert run["metrics"]["models/strong/accuracy"] == saved["models"]["strong"]["accuracy"]
        assert run["metrics"]["students/explicit/accuracy"] == saved["students"]["explicit"]["accuracy"]
    out = capsys.readouterr().out
    assert out.count("[sweep] rm tiny:1x32 -> tiny:2x64 seed") == 2 and "| rm | 2 |" in out
    logs = sorted((tmp_path / "logs").iterdir())
    assert [p.name for p in logs] == ["rm-tiny-1x32-tiny-2x64-s0.log", "rm-tiny-1x32-tiny-2x64-s1.log"]
    sweep.main(argv)
    assert all(p.read_text().count("cached in") == 4 for p in logs), "weak, strong and both students cached"
    assert sweep_json(tmp_path)["configurations"][0]["stats"] == c["stats"]
    assert math.isfinite(c["stats"]["gap"]["mean"])


def test_curve_rows_without_areas_still_give_ds():
    row = {"step": 1, "examples_seen": 32, "ds": 0.4}
    assert sweep.curve_value(row, "weak-unknown & strong-known") == 0.4
    assert sweep.curve_value(row, "weak-known & strong-known") is None
    assert sweep.curve_value({**row, "areas": {"weak-known & strong-known": 0.25}}, "weak-known & strong-known") == 0.25


def test_ds_gap_table_rows_by_gap_with_the_checked_areas_error():
    """The DS-vs-gap figure's numbers as a table: one row per configuration and student with a DS, by gap, named by
    its label, each cell the mean ± std over seeds; the same seed by seed, with ΔDS's McNemar p; a configuration
    without a gap (its ceilings unfinished) has no row."""
    def config(cid, label, gap, ds, err, delta=None, p=None):
        stats = {"gap": sweep.stat(gap), "students/none/ds": sweep.stat(ds[0]), "students/none/err_wk_sk": sweep.stat(err[0]),
                 "students/explicit/ds": sweep.stat(ds[1]), "students/explicit/err_wk_sk": sweep.stat(err[1]),
                 "students/explicit/delta_ds": sweep.stat(delta or []), "students/explicit/delta_ds_p": sweep.stat(p or [])}
        return {"id": cid, "label": label, "seeds": list(range(len(gap))), "stats": stats}
    wide = config("c1", "strong big", [0.06, 0.04], ([0.7, 0.8], [0.75, 0.85]), ([0.1, 0.2], [0.3, 0.4]), [0.05, 0.05],
                  [0.5, 0.04])
    narrow = config("c2", "strong small", [0.02], ([0.5], [0.6]), ([0.05], [0.06]), [0.1], [0.3])
    none = config("c3", "strong unfinished", [], ([], []), ([], []))
    lines = sweep.ds_gap_table([wide, narrow, none])
    assert lines[2].startswith("| configuration | student | seeds | gap |") and lines[3].startswith("|---|")
    assert lines[4:] == [
        "| strong small | none | 1 | 0.020 ± 0.000 | 0.500 ± 0.000 | – | 0.050 ± 0.000 |",
        "| strong small | explicit | 1 | 0.020 ± 0.000 | 0.600 ± 0.000 | 0.100 ± 0.000 | 0.060 ± 0.000 |",
        "| strong big | none | 2 | 0.050 ± 0.014 | 0.750 ± 0.071 | – | 0.150 ± 0.071 |",
        "| strong big | explicit | 2 | 0.050 ± 0.014 | 0.800 ± 0.071 | 0.050 ± 0.000 | 0.350 ± 0.071 |"]
    assert sweep.per_seed_table([wide, narrow, none])[6:] == [
        "| strong small | none | 0 | 0.020 | 0.500 | – | – | 0.050 |",
        "| strong small | explicit | 0 | 0.020 | 0.600 | 0.100 | 0.300 | 0.060 |",
        "| strong big | none | 0 | 0.060 | 0.700 | – | – | 0.100 |",
        "| strong big | none | 1 | 0.040 | 0.800 | – | – | 0.200 |",
        "| strong big | explicit | 0 | 0.060 | 0.750 | 0.050 | 0.500 | 0.300 |",
        "| strong big | explicit | 1 | 0.040 | 0.850 | 0.050 | 0.040 | 0.400 |"]


def test_configurations_are_named_by_what_tells_them_apart(tmp_path):
    """A ladder: configurations named by the options that differ, model paths without what they all share, an
    option at its unset value (no intermediate model, --student_seed -1) left out; the DS figure's point ids have
    their key; every table row of sweep.md stays under 160 characters."""
    runs = tmp_path / "runs"
    model = "models/smollm2-135m-instruct"
    ladder = [("a", {"strong": f"{model}:first8", "alpha": 0.5}), ("b", {"strong": f"{model}:first8", "alpha": 0.2}),
              ("c", {"strong": f"{model}:first16", "alpha": 0.5, "intermediate": f"{model}:first8"}),
              ("d", {"strong": f"{model}:first16", "alpha": 0.5, "student_seed": 1})]
    for name, options in ladder:
        three_seeds(runs, prefix=f"rm-{name}", **{"weak": f"{model}:first2", "intermediate": "", "student_seed": -1,
                                                  **options})
    result = aggregate([runs], tmp_path / "out")
    assert [c["label"] for c in result["configurations"]] == [
        "strong first8, alpha 0.5", "strong first8, alpha 0.2", "strong first16 via first8, alpha 0.5",
        "strong first16, alpha 0.5, student_seed 1"]
    assert sweep.ds_gap_data(result)["key"] == {c["id"]: c["label"] for c in result["configurations"]}
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "Model names without `models/smollm2-135m-instruct:`" in md
    assert max(len(line) for line in md.splitlines() if line.startswith("|")) < 160


def test_readme_tables_are_what_sweep_computes_from_the_committed_results(tmp_path):
    """Every table row of a README block that names its sweep command is a row of the sweep.md that command
    writes from the committed run folders, recomputed here; the committed sweep.md is that file too (but for
    the line with its date). A number in the README cannot drift from results/."""
    blocks = README_TABLES.findall((HERE / "README.md").read_text())
    assert blocks, "the README's real-model section names its sweep command"
    for command, block in blocks:
        argv = shlex.split(command)[2:]
        out = argv[argv.index("--out_dir") + 1]
        argv[argv.index("--out_dir") + 1] = str(tmp_path / "sweep")
        cwd = os.getcwd()
        os.chdir(HERE)  # the command's paths are relative to the repository, as a reader types it
        try:
            sweep.main(argv)
        finally:
            os.chdir(cwd)
        generated = (tmp_path / "sweep" / "sweep.md").read_text().splitlines()
        rows = [line for line in block.splitlines() if line.startswith("|")]
        assert len(rows) >= 3, command
        missing = [row for row in rows if row not in generated]
        assert not missing, f"README rows that `{command}` does not write: {missing}"
        committed = (HERE / out / "sweep.md").read_text().splitlines()
        assert len(committed) == len(generated)
        assert [a for a, b in zip(committed, generated) if a != b and not a.startswith("`python tools/sweep.py")] == []


# a README block of tables copied from a dose.md, with the command that writes it from results/; and any dose.py
# command the README names (its figure and numbers are read from that folder's dose.md)
README_DOSE = re.compile(r"<!-- tables from `(python tools/dose\.py [^`]+)` -->\n(.*?)<!-- end of tables -->", re.S)
README_DOSE_COMMAND = re.compile(r"`python (?:tools/)?dose\.py\s+(results/[^`\s]+)`")


def test_readme_dose_tables_are_what_dose_computes_from_the_committed_results():
    """Every dose.py folder the README names has a committed dose.md that is what dose.py computes from the
    committed run folders (dose.document, recomputed here), and every table row of a README block naming a dose.py
    command is a row of it."""
    from tools import dose
    readme = (HERE / "README.md").read_text()
    folders = README_DOSE_COMMAND.findall(readme)
    assert folders, "the README names the dose-response it shows"
    # the lines dose.py computes from each folder (a block's command names its folder too, so it is among them)
    generated = {folder: dose.document(HERE / folder)[0].splitlines() for folder in set(folders)}
    for folder, lines in generated.items():
        assert (HERE / folder / "dose.md").read_text().splitlines()[2:] == lines
    for command, block in README_DOSE.findall(readme):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        assert len(rows) >= 3, command
        assert [row for row in rows if row not in generated[shlex.split(command)[2]]] == [], \
            f"README rows that `{command}` does not write"


# a README block of rows copied from calibration.md, with the command that writes it from results/
README_CALIBRATION = re.compile(r"<!-- tables from `(python tools/calibrate\.py --summarize [^`]+)` -->\n(.*?)<!-- end of tables -->",
                                re.S)


def test_readme_calibration_rows_are_what_calibrate_computes_from_the_committed_results():
    """Every table row of a README block that names `calibrate.py --summarize FOLDER` is a row of the table that
    command computes from the committed stages (calibrate.summary, recomputed here), and the committed
    calibration.md is that text."""
    from tools import calibrate
    blocks = README_CALIBRATION.findall((HERE / "README.md").read_text())
    assert blocks, "the README's real-model section names its calibration command"
    for command, block in blocks:
        folder = shlex.split(command)[3]
        cwd = os.getcwd()
        os.chdir(HERE)  # the command's folder is relative to the repository, and the table's first line names it
        try:
            generated = calibrate.summary(folder)
        finally:
            os.chdir(cwd)
        rows = [line for line in block.splitlines() if line.startswith("|")]
        assert len(rows) >= 3, command
        assert [row for row in rows if row not in generated.splitlines()] == [], f"README rows `{command}` does not write"
        assert (HERE / folder / "calibration.md").read_text() == generated


def test_readme_arith_numbers_are_what_calibrate_computes_from_the_committed_results():
    """The README's arithmetic paragraph quotes validation accuracies (three decimals, 0.5 and above): each is in the
    table calibrate.py computes from the committed stages of results/arith-calibration, and the committed
    calibration.md there is that table (its rows are too wide to copy into the README)."""
    from tools import calibrate
    readme = (HERE / "README.md").read_text()
    section = readme[readme.index("### Arithmetic:"):readme.index("## Outputs")]
    cwd = os.getcwd()
    os.chdir(HERE)  # the table's first line names the folder as the README's command does
    try:
        generated = calibrate.summary("results/arith-calibration")
    finally:
        os.chdir(cwd)
    assert (HERE / "results/arith-calibration/calibration.md").read_text() == generated
    quoted = set(re.findall(r"\b0\.[5-9]\d\d\b", section))
    assert len(quoted) >= 10 and sorted(q for q in quoted if q not in generated) == []


# the signed numbers, "mean ± sd [lo, hi]" groups and three-decimal intervals a README findings paragraph quotes
README_QUOTED = re.compile(r"(?<![\w.])[+−-]?\d\.\d{3} ± \d\.\d{3}(?: \[[+−-]?\d\.\d{3}, [+−-]?\d\.\d{3}\])?"
                           r"|\[[+−-]?\d\.\d{3}, [+−-]?\d\.\d{3}\]|(?<![\w.])[+−-]\d\.\d{3}\b")


@pytest.mark.parametrize("heading, folder", [("### Real weights: SmolLM2", "results/ladder"),
                                             ("### Arithmetic:", "results/arith-ladder")])
def test_readme_findings_quote_the_committed_power_dose_and_sweep_files(heading, folder):
    """Each signed number, spread and interval a real testbed's README section quotes is written, as quoted, in
    its folder's power.md, dose.md or sweep/sweep.md. The HH ladder is final, so its power.md is also what
    power.py computes from its committed runs now; the arithmetic ladder's grows while its stages land, so there
    the committed file is the reference (regenerated with each commit of the README)."""
    from tools import power
    readme = (HERE / "README.md").read_text()
    start = readme.index(heading)
    section = readme[start:re.compile(r"^##", re.M).search(readme, start + 1).start()]  # up to the next heading
    files = [HERE / folder / name for name in ("power.md", "dose.md", "sweep/sweep.md")]
    written = "\n".join(f.read_text() for f in files if f.is_file()).replace("−", "-")
    quoted = [q.replace("−", "-") for q in README_QUOTED.findall(" ".join(section.split()))]  # across line breaks
    assert len(quoted) >= 4, heading
    assert [q for q in quoted if q not in written and q.lstrip("+") not in written] == []
    if folder == "results/ladder":
        cwd = os.getcwd()
        os.chdir(HERE)  # power.md names its folder as a reader types it
        try:
            generated = power.render(power.summarize(Path(folder)))
        finally:
            os.chdir(cwd)
        assert (HERE / folder / "power.md").read_text().split("\n", 2)[2] == generated, "power.md is not current"
