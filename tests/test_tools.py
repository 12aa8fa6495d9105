"""The tools are right or refuse: sweep.py, dose.py and calibrate.py on odd folders (a folder of the user's,
half-finished runs, two methods mixed, foreign run folders, misspelt paths), jsonl with U+2028 in a text, and
a method script offline. Each test reads what a user would see: the files written, or the one line of a refusal.

Run folders are built by hand as in test_sweep.py (make_run, three_seeds) and test_scoring.py (write_dose_run);
the calibration tests train tiny models (tiny:1x32) on 32 pairs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import common
import rm_w2s
import runs
from test_scoring import write_dose_run
from test_sweep import aggregate, make_run, student, three_seeds
from tools import calibrate, dose, sweep

HERE = Path(__file__).resolve().parents[1]  # the repository


def run_tool(argv, env=None, cwd=HERE):
    """A tool or method script as a user runs it: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return p.returncode, p.stdout, p.stderr


def one_line(err):
    """A refusal: one line on stderr, no traceback."""
    assert "Traceback" not in err, err
    [line] = err.strip().splitlines()
    return line


# ---- 1. sweep.py removes only the figures it drew

def test_sweep_never_removes_or_overwrites_a_file_it_did_not_write(tmp_path):
    runs_dir, out = tmp_path / "runs", tmp_path / "docs"
    three_seeds(runs_dir)
    three_seeds(runs_dir, prefix="rm-lr", lr=1e-3)
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "demo-areas.png").write_bytes(b"the README's figure")
    aggregate([runs_dir], out)
    drawn = {f["file"] for f in json.loads((out / "sweep.json").read_text())["figures"]}
    assert "figures/areas-c2.png" in drawn
    # again, over one configuration: the earlier sweep's figures that are not drawn again go, the user's stays
    aggregate([next(runs_dir.glob("rm-lr-s0-*"))], out)
    assert (out / "figures" / "demo-areas.png").read_bytes() == b"the README's figure"
    assert not (out / "figures" / "areas-c2.png").exists() and (out / "figures" / "areas-c1.png").exists()
    # a file of the user's under a name the sweep would write: refused in one line, the file untouched
    other = tmp_path / "other"
    (other / "figures").mkdir(parents=True)
    (other / "figures" / "ds_vs_gap.png").write_bytes(b"mine")
    with pytest.raises(SystemExit) as info:
        aggregate([runs_dir], other)
    assert str(info.value) == (f"error: --out_dir {other} holds figures/ds_vs_gap.png, which no sweep wrote there (no "
                               "sweep.json lists it); give an --out_dir of the sweep's own")
    assert (other / "figures" / "ds_vs_gap.png").read_bytes() == b"mine" and not (other / "sweep.md").exists()


# ---- 2. --student_seed equal to --seed is no churn run

def test_student_seed_equal_to_seed_is_refused_and_left_out_of_dose(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        rm_w2s.main(["--data", "toy", "--out_dir", str(tmp_path / "out"), "--seed", "3", "--student_seed", "3"])
    assert str(info.value) == ("error: --student_seed 3 is --seed: the students would train in the run's own data "
                               "order and change nothing; give another seed (a churn run) or leave it at -1")
    assert not (tmp_path / "out").exists()
    # such a run made before the refusal: its "churn" would read 0 against a student it did not train
    weak, strong, none = [False, True, True, False], [True] * 4, [True, True, False, False]
    write_dose_run(tmp_path / "pair", "rm-base", {"settings": "none,explicit"}, {
        "weak": weak, "strong": strong, "student-none": none, "student-explicit": [False, True, False, True]})
    write_dose_run(tmp_path / "pair", "rm-same", {"student_seed": 0}, {"student-none": none})
    dose.main([str(tmp_path / "pair")])
    assert list(json.loads((tmp_path / "pair" / "dose.json").read_text())["students"]) == ["alpha 0.5"]
    assert ("- `rm-same`: its --student_seed is its --seed (0): its students train in the base's data order, so it "
            "measures no churn") in (tmp_path / "pair" / "dose.md").read_text()
    assert f"dose.py: left out {tmp_path / 'pair' / 'rm-same'}: its --student_seed" in capsys.readouterr().err


# ---- 3. dose.py names every run folder it read and did not use

def test_dose_names_a_churn_run_stopped_during_its_student(tmp_path, capsys):
    weak, strong, none = [False, True, True, False], [True] * 4, [True, True, False, False]
    write_dose_run(tmp_path, "rm-base", {"settings": "none,explicit"}, {
        "weak": weak, "strong": strong, "student-none": none, "student-explicit": [False, True, False, True]})
    churn = write_dose_run(tmp_path, "rm-churn", {"student_seed": 1}, {"weak": weak, "strong": strong})
    (churn / "student-none").mkdir()  # killed while it trained: no stage.json
    dose.main([str(tmp_path)])
    text = (tmp_path / "dose.md").read_text()
    assert "- `rm-churn`: a churn run (--student_seed) whose no-conflict student is not finished" in text
    assert f"dose.py: left out {churn}: a churn run" in capsys.readouterr().err


# ---- 4. dose.py over two methods keeps every pair, headed by its method

def test_dose_over_two_methods_keeps_both_pairs(tmp_path):
    weak, strong = [False, True, True, False], [True] * 4
    for method, extra in (("rm", {}), ("dpo", {"beta": 0.1})):
        write_dose_run(tmp_path, f"{method}-pair", {"settings": "none,explicit", **extra}, {
            "weak": weak, "strong": strong, "student-none": [True, True, False, False],
            "student-explicit": [False, True, False, True]})
    dose.main([str(tmp_path)])
    assert list(json.loads((tmp_path / "dose.json").read_text())) == ["dpo: w -> s1", "rm: w -> s1"]
    text = (tmp_path / "dose.md").read_text()
    assert "## rm: w -> s1\n" in text and "## dpo: w -> s1\n" in text
    assert (tmp_path / "dose-1.png").exists() and (tmp_path / "dose-2.png").exists()


# ---- 5. dose.py --help, and a folder that is not there

def test_dose_help_and_a_missing_folder(tmp_path, capsys):
    dose.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python tools/dose.py RESULTS_FOLDER")
    with pytest.raises(SystemExit) as info:
        dose.main([str(tmp_path / "nosuch")])
    assert str(info.value) == f"error: {tmp_path / 'nosuch'} is not a folder"
    for argv in ([], ["a", "b"], ["--bogus"]):
        with pytest.raises(SystemExit, match="^usage: python tools/dose.py RESULTS_FOLDER"):
            dose.main(argv)
    assert not (tmp_path / "nosuch").exists()


# ---- 6.-9. calibrate.py --summarize reads, never creates; only calibration runs are rows; their own sizes

def calibration_run(root, name, margins, lr=1e-3, model="tiny:1x32", n_train=32, **config):
    """A finished calibration run folder as calibrate.py leaves it: config.json (recording its source), weak/ with
    predictions.jsonl (`margins`) and stage.json."""
    folder = root / name
    (folder / "weak").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "weak": model, "strong": model, "seed": 0, "lr": lr, "settings": "none", "data": "runs/calibration-data/x",
        "calibration": {"source": "data/a"}, **config}))
    runs.write_jsonl(folder / "weak" / "predictions.jsonl", common.prediction_rows(margins))
    (folder / "weak" / "stage.json").write_text(json.dumps({"n_train": n_train, "seconds": 120.0}))
    return folder


def test_calibrate_summarize_without_a_folder_or_with_a_misspelt_one(tmp_path):
    rc, _, err = run_tool(["tools/calibrate.py", "--summarize"])
    assert rc == 1 and one_line(err) == ("usage: python tools/calibrate.py --summarize FOLDER   (the table of the "
                                         "calibration runs in FOLDER)")
    rc, _, err = run_tool(["tools/calibrate.py", "--summarize", str(tmp_path / "calibratoin")])
    assert rc == 1 and one_line(err) == f"error: {tmp_path / 'calibratoin'} is not a folder"
    assert not (tmp_path / "calibratoin").exists()


def test_calibrate_summarize_rows_only_calibration_runs(tmp_path):
    calibration_run(tmp_path, "rm-cal", [1.0, -1.0, 2.0, 0.5])
    experiment = make_run(tmp_path, "rm-experiment", 0.6, 0.9, {"none": student(0.7, 0.3, 0.1)})
    runs.write_jsonl(experiment / "weak" / "predictions.jsonl", common.prediction_rows([1.0] * 4))
    calibrate.summarize(tmp_path)
    text = (tmp_path / "calibration.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| tiny")]
    assert rows == ["| tiny:1x32 | 0.001 | 0.750 [0.30, 0.95] | 1.125 | 0.241 | 1.000 | 2 min |"]  # |p - 0.5| by hand
    assert "- `rm-experiment`: not a calibration run (an experiment's run folder)" in text
    (tmp_path / "calibration.md").write_text("my notes")  # a calibration.md of the user's is never overwritten
    with pytest.raises(SystemExit, match="was not written by calibrate.py --summarize"):
        calibrate.summarize(tmp_path)
    assert (tmp_path / "calibration.md").read_text() == "my notes"


def test_calibrate_table_states_the_sizes_the_runs_used(tmp_path):
    calibration_run(tmp_path, "rm-cal", [1.0, -1.0, 2.0, 0.5], n_train=32)
    text = calibrate.summary(tmp_path)
    assert "trained on the first 32 pairs of the gt file (one epoch), scored on its last 4 (validation)" in text
    assert "3500" not in text and "500" not in text
    calibration_run(tmp_path, "rm-cal-2", [1.0, -1.0], lr=1e-4, n_train=64)  # sizes that differ: a column each
    rows = [line for line in calibrate.summary(tmp_path).splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | lr | train pairs | validation pairs | validation accuracy")
    assert [row.split(" | ")[2:4] for row in rows[1:]] == [["64", "2"], ["32", "4"]]


def test_calibrate_table_names_the_reward_heads_own_rate(tmp_path):
    """A run with --head_lr (the reward head's own rate) is told apart from one at the same lr without it."""
    calibration_run(tmp_path, "rm-cal", [1.0, -1.0], lr=1e-5)
    calibration_run(tmp_path, "rm-cal-head", [1.0, 1.0], lr=1e-5, head_lr=1e-2)
    rows = [line.split(" | ")[:3] for line in calibrate.summary(tmp_path).splitlines() if line.startswith("| tiny")]
    assert rows == [["| tiny:1x32", "1e-05", "0.500 [0.09, 0.91]"], ["| tiny:1x32", "1e-05 (head 0.01)",
                                                                       "1.000 [0.34, 1.00]"]]


def hh_pairs(n, tag, text=""):
    """n distinct HH-style pairs; `text` goes into every chosen response."""
    return [{"chosen": f"\n\nHuman: question {tag} {i}?\n\nAssistant: a careful answer {i}{text}",
             "rejected": f"\n\nHuman: question {tag} {i}?\n\nAssistant: no {i}"} for i in range(n)]


def data_folder(root, tag, text=""):
    """The paper's gt and w2s files, written raw (json.dumps with ensure_ascii=False, as many writers do)."""
    root.mkdir(parents=True)
    for name, n in (("harmless_train_gt", 48), ("harmless_train_w2s", 40)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n"
                                                    for p in hh_pairs(n, f"{tag} {name}", text)), encoding="utf-8")
    return root


def calibrate_tiny(data, out):
    calibrate.calibrate(["--data", str(data), "--weak", "tiny:1x32", "--lr", "1e-3", "--batch_size", "8",
                         "--micro_batch", "4", "--max_len", "64", "--out_dir", str(out)])


def test_calibrate_on_two_gt_files_keeps_both_rows_told_apart_by_data(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "N_TRAIN", 32)
    monkeypatch.setattr(calibrate, "N_VAL", 16)
    monkeypatch.chdir(tmp_path)  # the split files go to runs/calibration-data under the working folder
    for tag in ("a", "b"):
        calibrate_tiny(data_folder(tmp_path / "data" / tag, tag), tmp_path / "calibration")
    configs = [json.loads(p.read_text()) for p in sorted((tmp_path / "calibration").glob("*/config.json"))]
    assert sorted(c["calibration"]["source"] for c in configs) == [str(tmp_path / "data" / t) for t in ("a", "b")]
    assert configs[0]["data"] != configs[1]["data"]
    text = calibrate.summary(tmp_path / "calibration")
    assert "| model | lr | data | validation accuracy" in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny:1x32")]
    assert [row.split(" | ")[2] for row in rows] == [str(tmp_path / "data" / t) for t in ("a", "b")]
    assert "first 32 pairs of the gt file (one epoch), scored on its last 16" in text


# ---- 10. jsonl: a text holding U+2028 is one line, written and read the same way everywhere

def test_a_text_with_a_line_separator_round_trips(tmp_path, monkeypatch):
    data = data_folder(tmp_path / "data", "u", text=" one\u2028two")
    assert [p["chosen"] for p in common.read_pairs(data / "harmless_train_gt.jsonl")] == \
        [p["chosen"] for p in hh_pairs(48, "u harmless_train_gt", " one\u2028two")]
    monkeypatch.setattr(calibrate, "N_TRAIN", 32)
    monkeypatch.setattr(calibrate, "N_VAL", 16)
    monkeypatch.chdir(tmp_path)
    calibrate_tiny(data, tmp_path / "calibration")
    [config] = [json.loads(p.read_text()) for p in (tmp_path / "calibration").glob("*/config.json")]
    gt = common.read_pairs(data / "harmless_train_gt.jsonl")
    assert common.read_pairs(Path(config["data"]) / "harmless_train_gt.jsonl") == gt[:32]
    assert common.read_pairs(Path(config["data"]) / "harmless_test.jsonl") == gt[-16:]


# ---- 11. offline, a Hub model or dataset that is not cached is one line

def test_offline_a_model_or_dataset_not_in_the_cache_is_one_line(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "ds")}
    out = tmp_path / "out"
    rc, _, err = run_tool(["rm_w2s.py", "--strong", "nosuch-org/no-such-model", "--out_dir", str(out)], env=offline)
    line = one_line(err)
    assert rc == 1 and line.startswith("error: offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache (")
    assert line.endswith("--weak gpt2, --strong nosuch-org/no-such-model; download once online, or point --weak / "
                         "--strong / --intermediate at a local model folder (save_pretrained) or .gguf file")
    rc, _, err = run_tool(["rm_w2s.py", "--weak", "tiny:1x32", "--strong", "tiny:2x64", "--data", "hh",
                           "--out_dir", str(out)], env=offline)
    line = one_line(err)
    assert rc == 1 and line.startswith("error: the Hub dataset Anthropic/hh-rlhf (harmless-base) could not be loaded (")
    assert line.endswith("or give --data a folder with the paper's harmless_*.jsonl files (and --helpful a jsonl of "
                         "helpfulness pairs for the implicit setting), or --data toy")
    assert not out.exists(), "nothing is written before the models and the data are there"


# ---- beyond the eleven: empty, foreign and half-finished folders are one line, and nothing is written

def test_odd_folders_are_one_line_and_write_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=f"^error: no run folder under {empty} "):
        sweep.main(["--runs", str(empty), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match=r"^error: .*: no run folder in it \(a folder with a run's config.json\)$"):
        dose.main([str(empty)])
    with pytest.raises(SystemExit, match=r"^error: .* holds no finished calibration run \(no run folders\)$"):
        calibrate.summarize(empty)
    # a run folder itself, where dose.py wants the folder holding a pair's runs
    run = write_dose_run(tmp_path / "pair", "rm-base", {}, {"weak": [True], "strong": [True], "student-none": [True]})
    with pytest.raises(SystemExit, match="is a run folder; give the folder that holds the pair's run folders"):
        dose.main([str(run)])
    # a pair with nothing to read against its base: one line naming why
    with pytest.raises(SystemExit, match="no student to read against the base run's no-conflict student"):
        dose.main([str(tmp_path / "pair")])
    # a dose.md of the user's is never overwritten
    write_dose_run(tmp_path / "pair", "rm-alpha", {"settings": "explicit", "alpha": 0.2}, {"student-explicit": [False]})
    (tmp_path / "pair" / "dose.md").write_text("my notes")
    with pytest.raises(SystemExit, match="holds dose.md, which dose.py did not write"):
        dose.main([str(tmp_path / "pair")])
    assert (tmp_path / "pair" / "dose.md").read_text() == "my notes" and not (tmp_path / "pair" / "dose.json").exists()
    assert sorted(p.name for p in empty.iterdir()) == []


# ---- 12. calibrate.py on the arithmetic testbed, for every method: its validation split, per tier, zero-shot

def arith_tool(out, method, *extra):
    calibrate.calibrate(["--data", "arith", "--method", method, "--weak", "tiny:1x32", "--n_gt", "32", "--n_test", "32",
                         "--lr", "1e-3", "--epochs", "1", "--batch_size", "8", "--micro_batch", "8", "--max_len", "64",
                         "--out_dir", str(out), *extra])


def test_calibrate_arith_trains_each_method_and_scores_zero_shot_on_the_validation_split(tmp_path):
    """One tiny stage per method on arith's gt split, scored on its validation split (the run is arith:val), with
    per-tier accuracies over all 32 pairs; zero-shot rows for DPO and SimPO from the untrained policy, whose DPO
    margins are the reference margins a DPO stage without SFT records (its margin minus its implicit margin)."""
    import arith
    out = tmp_path / "calibration"
    arith_tool(out, "rm")
    arith_tool(out, "dpo", "--sft_epochs", "0")
    arith_tool(out, "simpo")
    arith_tool(out, "dpo", "--sft_epochs", "0", "--zero_shot")  # the trained DPO run's own folder
    arith_tool(out, "simpo", "--zero_shot", "--lr", "1e-4")  # a learning rate no trained run used: its own folder
    configs = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/config.json")}
    assert {c["data"] for c in configs.values()} == {"arith:val"}
    assert sorted(c["calibration"]["method"] for c in configs.values()) == ["dpo", "rm", "simpo", "simpo"]
    assert {json.dumps({k: v for k, v in c["calibration"].items() if k != "method"}) for c in configs.values()} == \
        {json.dumps({"source": "arith", "gt_split": 32, "validation_split": 32})}
    [dpo_run] = [out / name for name, c in configs.items() if c["calibration"]["method"] == "dpo"]
    assert not list((dpo_run / "zero-shot").glob("*metrics.jsonl")), "zero-shot trains nothing"
    zero_shot = [row["margin"] for row in common.read_jsonl(dpo_run / "zero-shot" / "predictions.jsonl")]
    trained = common.read_jsonl(dpo_run / "weak" / "predictions.jsonl")
    assert zero_shot == pytest.approx([row["margin"] - row["implicit_margin"] for row in trained], abs=1e-4)
    rows, left_out = calibrate.calibration_rows(out)
    assert left_out == []
    assert [(r["method"], r["lr"]) for r in rows] == [("rm", 1e-3), ("dpo", None), ("dpo", 1e-3), ("simpo", None),
                                                      ("simpo", 1e-3)]
    for r in rows:
        assert {t: n for t, (_, n) in r["tiers"].items()} == arith.tier_counts(32)  # 7 + 7 + 6 + 6 + 6 = 32
        assert sum(k for k, _ in r["tiers"].values()) / 32 == r["accuracy"]
    text = calibrate.summary(out)
    assert "| method | model | lr | validation accuracy [95% CI] | add2 | add3 | sub3 | mul31 | mul22 | mean" in text
    assert "trained on arith's gt split of 32 pairs (rm: one epoch; dpo: no SFT, then one epoch; simpo: SFT 1 epoch, " \
           "then one epoch), scored on 32 pairs of its validation split" in text
    dpo_rows = [line for line in text.splitlines() if line.startswith("| dpo")]
    assert [row.split(" | ")[2] for row in dpo_rows] == ["– (zero-shot)", "0.001"]


def arith_calibration_run(root, name, margins, method="rm", stage="weak", key="k", lr=1e-3):
    """A finished arith calibration run folder by hand: its config as calibrate.py writes it, one stage."""
    folder = root / name
    (folder / stage).mkdir(parents=True)
    config = {"weak": "tiny:1x32", "strong": "tiny:1x32", "seed": 0, "lr": lr, "settings": "none", "data": "arith:val",
              "n_gt": 32, "n_w2s": 32, "n_test": len(margins), "epochs": 1,
              "calibration": {"method": method, "source": "arith", "gt_split": 32, "validation_split": len(margins)}}
    (folder / "config.json").write_text(json.dumps(config))
    runs.write_jsonl(folder / stage / "predictions.jsonl", common.prediction_rows(margins))
    (folder / stage / "stage.json").write_text(json.dumps({"n_train": 0 if stage == "zero-shot" else 32,
                                                           "seconds": 30.0, "key": key}))
    return config


def test_calibrate_table_has_a_method_column_only_where_methods_differ_and_one_row_per_zero_shot_stage(tmp_path):
    import arith
    config = arith_calibration_run(tmp_path, "rm-a", [1.0] * 10)
    right_on_add2 = [1.0 if t == "add2" else -1.0 for t in arith.tiers_of_test_split(config)]
    arith_calibration_run(tmp_path, "rm-b", right_on_add2, lr=1e-4)
    text = calibrate.summary(tmp_path)
    assert "| model | lr | validation accuracy [95% CI] | add2 | add3 | sub3 | mul31 | mul22 |" in text
    assert "| tiny:1x32 | 0.0001 | 0.200 [0.06, 0.51] | 1.000 | 0.000 | 0.000 | 0.000 | 0.000 |" in text  # 2 of 10
    assert "reward-model ceilings trained on arith's gt split of 32 pairs (one epoch), scored on 10 pairs" in text
    assert "(add2 2, add3 2, sub3 2, mul31 2, mul22 2 pairs)" in text
    # a zero-shot stage copied into a second run folder (the same key) is one row; a DPO row brings the method column
    arith_calibration_run(tmp_path, "dpo-a", [1.0] * 10, method="dpo", stage="zero-shot", key="z")
    arith_calibration_run(tmp_path, "dpo-b", [1.0] * 10, method="dpo", stage="zero-shot", key="z", lr=1e-5)
    rows = [line for line in calibrate.summary(tmp_path).splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | model | lr | validation accuracy")
    assert [row.split(" | ")[0:3] for row in rows[1:]] == [
        ["| rm", "tiny:1x32", "0.0001"], ["| rm", "tiny:1x32", "0.001"], ["| dpo", "tiny:1x32", "– (zero-shot)"]]


def test_calibrate_refuses_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    refusals = [(["--method", "ppo"], "error: --method takes rm, dpo or simpo, got 'ppo'"),
                (["--zero_shot"], "error: --zero_shot scores the policy's own likelihood (--method dpo or simpo)"),
                (["--data", "hh"], "error: --data hh: calibration reads a folder with the paper's"),
                (["--data", "arith", "--n_test", "2001"], "error: --data arith:val holds 2000 validation pairs"),
                (["--method"], "error: --method needs a value: rm, dpo or simpo")]
    for argv, line in refusals:
        with pytest.raises(SystemExit) as info:
            calibrate.calibrate(["--weak", "tiny:1x32", "--out_dir", str(out), *argv])
        assert str(info.value).startswith(line), (argv, str(info.value))
    rc, _, err = run_tool(["tools/calibrate.py", "--method", "rm", "--zero_shot", "--out_dir", str(out)])
    assert rc == 1 and one_line(err).startswith("error: --zero_shot scores")
    assert not out.exists()
