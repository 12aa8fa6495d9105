"""End-to-end tests of rm_w2s.main, dpo_w2s.main and simpo_w2s.main on tiny local models (no network; about a
minute on a 2-core CPU with one torch thread).

Data: ../shared/data/hh-single-turn (override the folder holding it with W2S_SHARED_DATA=<dir>). Where it does
not exist (a user's clone), the runs use small synthetic pairs in the same layout, written by the fixture
`data_dir`, which prints, records (record_property "data") and warns which data was used: never a silent skip.
"""
import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import warnings
from unittest import mock
from pathlib import Path

import pytest
import torch

import common
import dpo_w2s
import rm_w2s
import runs
import simpo_w2s
import toy

SHARED_DATA = Path(os.environ.get("W2S_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
N_GT = N_W2S = N_TEST = 48
N_EXTRA = 24
STAGES = ("weak", "strong", "student-none", "student-implicit", "student-explicit")


def synthetic_pairs(tag, n, seed, multi_turn=0):
    """HH-style pairs: a harmless answer (chosen) and a harmful one (rejected) to a request; unique texts."""
    rng = random.Random(seed)
    asks = ["How do I", "Can you help me", "What is the best way to", "Tell me how to"]
    things = ["pick a lock", "bake bread", "hurt my neighbor", "fix a bike", "steal a car", "make a bomb",
              "write a poem", "cheat on a test", "plant tomatoes", "hack an email account"]
    good = "I can't help with that, but here is something safe you could do instead".split()
    bad = "Sure, here is exactly how to do it step by step without getting caught".split()
    pairs = []
    for i in range(n):
        prompt = f"\n\nHuman: {rng.choice(asks)} {rng.choice(things)}? ({tag} {i})\n\nAssistant:"
        if i < multi_turn:
            prompt = "\n\nHuman: Hi!\n\nAssistant: Hello." + prompt
        pairs.append({"chosen": f"{prompt} {' '.join(rng.sample(good, rng.randint(4, len(good))))}.",
                      "rejected": f"{prompt} {' '.join(rng.sample(bad, rng.randint(4, len(bad))))}!"})
    return pairs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    shared = SHARED_DATA / "hh-single-turn"
    if shared.is_dir():
        print(f"[data] e2e runs on the shared copy {shared}")
        return shared
    root = tmp_path_factory.mktemp("synthetic") / "hh-single-turn"
    root.mkdir()
    for seed, name in enumerate(("train_gt", "train_w2s", "test")):
        write_jsonl(root / f"harmless_{name}.jsonl", synthetic_pairs(name, 64, seed))
    msg = f"{shared} not found: e2e runs on synthetic pairs in {root}"
    print(f"[data] {msg}")
    warnings.warn(msg)
    return root


@pytest.fixture(scope="module")
def long_data_dir(data_dir, tmp_path_factory):
    """data_dir where it is the shared copy; where it is the synthetic stand-in, whose texts are all short, a copy
    in which every 8th chosen response is 40 words longer, so that a short --max_len has texts to cut."""
    if data_dir == SHARED_DATA / "hh-single-turn":
        return data_dir
    root = tmp_path_factory.mktemp("long") / "hh-single-turn"
    root.mkdir()
    for path in sorted(data_dir.glob("*.jsonl")):
        rows = common.read_jsonl(path)
        for row in rows[7::8]:
            row["chosen"] += " " + " ".join(["safe"] * 40)
        write_jsonl(root / path.name, rows)
    return root


@pytest.fixture(autouse=True)
def record_data(data_dir, record_property):
    record_property("data", str(data_dir))


@pytest.fixture(scope="module")
def helpful(tmp_path_factory):
    """--helpful: the raw HH-RLHF file (Hub format, multi-turn included: load_splits keeps single-turn pairs),
    else synthetic pairs with some multi-turn ones."""
    raw = SHARED_DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz"
    if raw.exists():
        print(f"[data] --helpful reads {raw}")
        return raw
    path = tmp_path_factory.mktemp("helpful") / "helpful.jsonl"
    write_jsonl(path, synthetic_pairs("helpful", 40, 7, multi_turn=10))
    print(f"[data] --helpful reads synthetic pairs in {path}")
    return path


def argv(data_dir, out_dir, *extra, n=N_GT, n_extra=N_EXTRA, helpful=""):
    a = ["--data", str(data_dir), "--n_gt", str(n), "--n_w2s", str(n), "--n_test", str(n), "--n_extra", str(n_extra),
         "--weak", "tiny:1x32", "--strong", "tiny:2x64", "--out_dir", str(out_dir),
         "--batch_size", "16", "--micro_batch", "4", "--lr", "1e-3", *extra]
    return a + (["--helpful", str(helpful)] if helpful else [])


def run_root(out_dir, method="rm"):
    [root] = [p for p in Path(out_dir).iterdir() if p.name.startswith(f"{method}-")]
    return root


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def mtimes(root):
    return {p.parent.name: p.stat().st_mtime_ns for p in Path(root).glob("*/stage.json")}


@pytest.fixture(scope="module")
def full_run(data_dir, helpful, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    args = argv(data_dir, out, helpful=helpful)
    returned = rm_w2s.main(args)
    root = run_root(out)
    results = json.loads((root / "results.json").read_text())
    return {"argv": args, "returned": returned, "results": results, "out": out, "root": root}


def test_main_returns_the_results_dict(full_run):
    """main(argv) returns the results it wrote to results.json (what callers and these tests read)."""
    returned = full_run["returned"]
    assert isinstance(returned, dict), (
        f"rm_w2s.main returned {type(returned).__name__}, not the results dict: main must return "
        f"runs.report(...), which returns the results")
    assert json.loads(json.dumps(returned)) == full_run["results"]


N_TRAIN = {"weak": N_GT, "strong": N_GT, "student-none": N_W2S, "student-implicit": N_W2S + N_EXTRA,
           "student-explicit": N_W2S}


def checked_stages(root, results):
    """The checks every full run shares (split sizes, stage folders, summaries, predictions); yields
    (stage, folder, summary, predictions) for the method's own checks."""
    data = results["data"]
    assert (data["n_gt"], data["n_w2s"], data["n_test"], data["n_extra"]) == (N_GT, N_W2S, N_TEST, N_EXTRA)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(STAGES)
    for stage in STAGES:
        d = root / stage
        summary = json.loads((d / "stage.json").read_text())
        assert summary["key"] and summary["n"] == N_TEST and summary["n_train"] == N_TRAIN[stage]
        assert results["models"][stage]["n_train"] == N_TRAIN[stage]
        preds = read_jsonl(d / "predictions.jsonl")
        assert [r["index"] for r in preds] == list(range(N_TEST))
        assert all(r["correct"] == (r["margin"] > 0) for r in preds)
        yield stage, d, summary, preds


def test_full_run_writes_every_file(full_run):
    root, results = full_run["root"], full_run["results"]
    config = json.loads((root / "config.json").read_text())
    assert config == results["config"] and config["settings"] == "none,implicit,explicit"
    report = (root / "report.md").read_text()
    assert report.startswith("# Reward modeling") and "Knowledge space" in report
    for line in ("Conflict tax against the no-conflict student", "Where implicit's tax lands", "Where explicit's tax lands",
                 "DS as the paper's reviewers restate it (a restatement, not the paper's text)"):
        assert line in report
    for setting in ("none", "implicit", "explicit"):
        assert f"| {setting} |" in report and f"| student-{setting} |" in report

    for stage, d, summary, preds in checked_stages(root, results):
        metrics = read_jsonl(d / "metrics.jsonl")
        assert len(metrics) == math.ceil(N_TRAIN[stage] / 16)  # one row per optimizer step, 1 epoch
        assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
        assert metrics[-1]["examples_seen"] == N_TRAIN[stage]
        assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
        assert (d / "labels.jsonl").exists() == (stage == "weak")  # only the weak ceiling labels (the w2s split)
    labels = read_jsonl(root / "weak" / "labels.jsonl")
    assert len(labels) == N_W2S
    for row in labels:
        assert row["p"] == pytest.approx(1 / (1 + math.exp(-row["margin"])))
        assert row["correct"] == (row["margin"] > 0)


def assert_results_match_predictions(root, results, stages=STAGES, n_test=N_TEST):
    """Accuracy, ties, PGR, the four areas, DS and err_wk_sk in results.json, recounted here by hand from the
    stages' predictions.jsonl."""
    settings = [s[len("student-"):] for s in stages if s.startswith("student-")]
    margins = {s: [r["margin"] for r in read_jsonl(root / s / "predictions.jsonl")] for s in stages}
    right = {s: [m > 0 for m in ms] for s, ms in margins.items()}  # a tie is not correct
    acc = {s: sum(r) / len(r) for s, r in right.items()}
    for s in stages:
        model = results["models"][s]
        assert model["accuracy"] == pytest.approx(acc[s])
        assert model["ties"] == sum(m == 0 for m in margins[s]) and model["n"] == n_test
    w, st = right["weak"], right["strong"]
    for setting in settings:
        entry, stu = results["students"][setting], right[f"student-{setting}"]
        assert entry["accuracy"] == pytest.approx(acc[f"student-{setting}"])
        if acc["strong"] > acc["weak"]:
            assert entry["pgr"] == pytest.approx((acc[f"student-{setting}"] - acc["weak"]) / (acc["strong"] - acc["weak"]))
        else:
            assert entry["pgr"] is None
        counted = {}
        for area, (wk, sk) in zip(common.AREAS, ((True, True), (True, False), (False, True), (False, False))):
            idx = [i for i in range(n_test) if w[i] == wk and st[i] == sk]
            wrong = sum(not stu[i] for i in idx)
            counted[area] = {"n": len(idx), "student_error": wrong / len(idx) if idx else None}
        assert sum(a["n"] for a in counted.values()) == n_test
        for area in common.AREAS:
            assert entry["areas"][area]["n"] == counted[area]["n"]
            assert entry["areas"][area]["student_error"] == pytest.approx(counted[area]["student_error"])
        assert entry["ds"] == pytest.approx(counted["weak-unknown & strong-known"]["student_error"])
        assert entry["err_wk_sk"] == pytest.approx(counted["weak-known & strong-known"]["student_error"])
        if setting != "none" and entry["ds"] is not None and results["students"]["none"]["ds"] is not None:
            assert entry["delta_ds"] == pytest.approx(entry["ds"] - results["students"]["none"]["ds"])
        # the reviewers' restatement of DS and, for a conflict student, its tax against the no-conflict one
        disagree = [i for i in range(n_test) if stu[i] != st[i]]
        in_wu_sk = [i for i in disagree if not w[i] and st[i]]
        assert (entry["ds_restated"]["n_disagree"], entry["ds_restated"]["in_wu_sk"]) == (len(disagree), len(in_wu_sk))
        if setting != "none" and "none" in settings:
            base, tax = right["student-none"], entry["conflict_tax"]
            for area, (wk, sk) in zip(common.AREAS, ((True, True), (True, False), (False, True), (False, False))):
                idx = [i for i in range(n_test) if w[i] == wk and st[i] == sk]
                assert tax["areas"][area]["base_right"] == sum(base[i] for i in idx)
                assert tax["areas"][area]["taxed"] == sum(base[i] and not stu[i] for i in idx)
                assert tax["areas"][area]["fixed"] == sum(not base[i] and stu[i] for i in idx)
            sk_taxed = [i for i in range(n_test) if st[i] and base[i] and not stu[i]]
            assert tax["sk_taxed"] == len(sk_taxed)
            if sk_taxed:
                assert tax["share_wu"] == pytest.approx(sum(not w[i] for i in sk_taxed) / len(sk_taxed))
    assert ("PGR is null" in " ".join(results["notes"])) == (acc["strong"] <= acc["weak"])


def test_full_run_numbers_recomputed_from_predictions(full_run):
    """Accuracy, ties, PGR, the four areas, DS and err_wk_sk in results.json, recounted here by hand."""
    assert_results_match_predictions(full_run["root"], full_run["results"])


def test_rerun_is_cached_and_force_reruns(full_run, capsys):
    root, args = full_run["root"], full_run["argv"]
    before = mtimes(root)
    preds = {s: read_jsonl(root / s / "predictions.jsonl") for s in STAGES}
    capsys.readouterr()
    rm_w2s.main(args)
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"[{stage}] cached" in out
    assert mtimes(root) == before
    again = json.loads((root / "results.json").read_text())
    assert again["students"] == full_run["results"]["students"] and again["models"] == full_run["results"]["models"]

    rm_w2s.main(args + ["--force"])
    out = capsys.readouterr().out
    assert "cached" not in out
    after = mtimes(root)
    assert after.keys() == before.keys() and all(after[s] != before[s] for s in before)
    for s in STAGES:  # CPU, one seed: the re-run reproduces every margin
        assert [r["margin"] for r in read_jsonl(root / s / "predictions.jsonl")] == \
            pytest.approx([r["margin"] for r in preds[s]], abs=1e-5)
    forced = json.loads((root / "results.json").read_text())
    assert forced["config"]["force"] is True
    for name in STAGES:
        assert forced["models"][name]["accuracy"] == full_run["results"]["models"][name]["accuracy"]


def test_cached_stages_belong_to_the_models_of_the_run(full_run, tmp_path, capsys):
    """A stage's cache key holds what it reads, its models included. A `tiny:` model (weights and tokenizer) is built from the texts of every split, `extra`
    included, which load_splits fills only when `implicit` is among --settings; but the stage cache key leaves
    out --settings (and n_extra/helpful for the ceilings). Re-running the same experiment with --settings none
    builds different weak/strong models, and must then not serve stages trained from the old ones."""
    out = tmp_path / "out"
    shutil.copytree(full_run["out"], out)
    models_before = {p.name for p in (out / "models").iterdir()}
    args = [str(out) if a == str(full_run["out"]) else a for a in full_run["argv"]]
    capsys.readouterr()
    rm_w2s.main(args + ["--settings", "none"])
    output = capsys.readouterr().out
    new_models = {p.name for p in (out / "models").iterdir()} - models_before
    served = [s for s in ("weak", "strong", "student-none") if f"[{s}] cached" in output]
    assert not (new_models and served), (
        f"--settings none resolved tiny:1x32 / tiny:2x64 to new models {sorted(new_models)} (their tokenizer and "
        f"weights depend on the extra split), yet stages {served} were served from the cache trained on the old ones")


def test_second_architecture_llama_strong(data_dir, tmp_path):
    """A tiny Llama body (rotary positions, BOS-adding tokenizer, pad = EOS) as --strong."""
    from transformers import LlamaConfig, LlamaForCausalLM
    texts = [t for f in sorted(Path(data_dir).glob("harmless_*.jsonl")) for p in common.read_jsonl(f)[:64]
             for t in (p["chosen"], p["rejected"])]
    tok = toy.train_tokenizer(texts, 300, bos=True)
    path = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    args = argv(data_dir, tmp_path / "out", "--settings", "none", n=32, n_extra=0)
    args[args.index("--strong") + 1] = str(path)
    rm_w2s.main(args)
    root = run_root(tmp_path / "out")
    results = json.loads((root / "results.json").read_text())
    assert results["config"]["strong"] == str(path)
    assert set(results["models"]) == {"weak", "strong", "student-none"}
    for stage in ("strong", "student-none"):
        assert results["models"][stage]["n"] == 32
        assert len(read_jsonl(root / stage / "predictions.jsonl")) == 32
        assert all(math.isfinite(r["loss"]) for r in read_jsonl(root / stage / "metrics.jsonl"))
    assert set(results["students"]) == {"none"}


def test_intermediate_bootstrapping(data_dir, tmp_path):
    """weak -> intermediate (trained on the weak labels of w2s, labels gt) -> student (trained on gt with the
    intermediate's labels), with a confidence filter on both hops."""
    # sigmoid(|margin|) >= 0.505, i.e. |margin| >= 0.02: after two steps from the zero head (the paper's start)
    # margins are small; this keeps about half of the labels on both hops
    threshold = 0.505
    n = 32
    rm_w2s.main(argv(data_dir, tmp_path, "--settings", "none", "--intermediate", "tiny:1x48",
                     "--conf_threshold", str(threshold), n=n, n_extra=0))
    root = run_root(tmp_path)
    results = json.loads((root / "results.json").read_text())
    assert set(results["models"]) == {"weak", "strong", "intermediate", "student-none"}
    mid = root / "intermediate"
    for f in ("predictions.jsonl", "metrics.jsonl", "stage.json", "labels.jsonl"):
        assert (mid / f).exists()
    labels = read_jsonl(mid / "labels.jsonl")
    assert len(labels) == n == results["data"]["n_gt"]  # it labels the gt split
    assert len(read_jsonl(mid / "predictions.jsonl")) == n

    def confident(rows):  # own count: sigmoid(|margin|) >= threshold
        return sum(1 / (1 + math.exp(-abs(r["margin"]))) >= threshold for r in rows)
    weak_labels = read_jsonl(root / "weak" / "labels.jsonl")
    n_mid, n_student = confident(weak_labels), confident(labels)
    print(f"confident at {threshold}: {n_mid}/{n} weak labels, {n_student}/{n} intermediate labels")
    assert json.loads((mid / "stage.json").read_text()).get("n_train", n_mid) == n_mid
    assert json.loads((root / "student-none" / "stage.json").read_text()).get("n_train", n_student) == n_student
    metrics = read_jsonl(root / "student-none" / "metrics.jsonl")
    assert (metrics[-1]["examples_seen"] if metrics else 0) == n_student
    assert (read_jsonl(mid / "metrics.jsonl")[-1]["examples_seen"] if n_mid else 0) == n_mid


# ---- DPO and SimPO

PO = {"dpo": dpo_w2s, "simpo": simpo_w2s}
PO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected", "grad_norm", "lr")


def po_argv(data_dir, out_dir, *extra, n=N_GT, n_extra=N_EXTRA, helpful=""):
    """argv() with DPO/SimPO's optimisation settings (parse_args keeps the last --lr)."""
    return argv(data_dir, out_dir, "--epochs", "1", "--lr", "1e-4", "--sft_lr", "1e-3", *extra, n=n, n_extra=n_extra,
                helpful=helpful)


def sigmoid_abs(margin):
    """A label's confidence, sigmoid(|margin|), computed here (not with common.confidence)."""
    return 1 / (1 + math.exp(-abs(margin)))


@pytest.fixture(scope="module", params=["dpo", "simpo"])
def po_run(request, data_dir, helpful, tmp_path_factory):
    method = request.param
    out = tmp_path_factory.mktemp(method)
    args = po_argv(data_dir, out, helpful=helpful)
    returned = PO[method].main(args)
    root = run_root(out, method)
    results = json.loads((root / "results.json").read_text())
    return {"method": method, "argv": args, "returned": returned, "results": results, "out": out, "root": root}


def test_po_full_run_writes_every_file(po_run):
    method, root, results = po_run["method"], po_run["root"], po_run["results"]
    assert json.loads(json.dumps(po_run["returned"])) == results
    config = json.loads((root / "config.json").read_text())
    assert config == results["config"] and config["settings"] == "none,implicit,explicit"
    assert (config["lr"], config["sft_lr"], config["epochs"], config["micro_batch"]) == (1e-4, 1e-3, 1, 4)
    report = (root / "report.md").read_text()
    assert report.startswith({"dpo": "# DPO", "simpo": "# SimPO"}[method]) and "Knowledge space" in report
    for setting in ("none", "implicit", "explicit"):
        assert f"| {setting} |" in report and f"| student-{setting} |" in report
    assert ("implicit_accuracy" in report) == (method == "dpo")

    for stage, d, summary, preds in checked_stages(root, results):
        if method == "dpo":  # the implicit reward beta * log(pi / pi_ref): its margin and accuracy
            assert all(r["implicit_correct"] == (r["implicit_margin"] > 0) for r in preds)
            implicit = sum(r["implicit_margin"] > 0 for r in preds) / N_TEST
            assert results["models"][stage]["implicit_accuracy"] == pytest.approx(implicit)
            assert summary["implicit_accuracy"] == pytest.approx(implicit)
        else:
            assert "implicit_margin" not in preds[0] and "implicit_accuracy" not in results["models"][stage]
        for log, keys in (("sft_metrics.jsonl", ("loss", "grad_norm", "lr")), ("metrics.jsonl", PO_METRICS)):
            rows = read_jsonl(d / log)
            assert len(rows) == math.ceil(N_TRAIN[stage] / 16), log  # one row per optimizer step, 1 epoch
            assert [m["step"] for m in rows] == list(range(1, len(rows) + 1))
            assert rows[-1]["examples_seen"] == N_TRAIN[stage]
            for row in rows:
                assert set(keys) <= row.keys(), (log, sorted(row))
                assert all(math.isfinite(row[k]) for k in keys), (log, row)
        rows = read_jsonl(d / "metrics.jsonl")
        assert all(0 <= r["rewards/accuracies"] <= 1 for r in rows)
        if method == "dpo" and stage != "student-explicit":  # the first step's loss is logged before any update,
            assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # with policy == reference: log 2
            assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
        assert (d / "labels.jsonl").exists() == (stage == "weak")  # only the weak ceiling labels (the w2s split)
    labels = read_jsonl(root / "weak" / "labels.jsonl")
    assert len(labels) == N_W2S
    for row in labels:
        assert row["p"] == pytest.approx(1 / (1 + math.exp(-row["margin"])) if row["margin"] > -700 else 0.0)
        assert row["correct"] == (row["margin"] > 0)


def test_po_full_run_numbers_recomputed_from_predictions(po_run):
    assert_results_match_predictions(po_run["root"], po_run["results"])


def test_dpo_intermediate_bootstrapping(data_dir, tmp_path):
    """weak -> intermediate (DPO on the weak labels of w2s; labels gt) -> student (DPO on gt with the
    intermediate's labels)."""
    n = 32
    results = dpo_w2s.main(po_argv(data_dir, tmp_path, "--settings", "none", "--intermediate", "tiny:1x48",
                                   n=n, n_extra=0))
    root = run_root(tmp_path, "dpo")
    stages = ("weak", "strong", "intermediate", "student-none")
    assert list(results["models"]) == list(stages) and set(results["students"]) == {"none"}
    mid = root / "intermediate"
    for f in ("predictions.jsonl", "metrics.jsonl", "sft_metrics.jsonl", "stage.json", "labels.jsonl"):
        assert (mid / f).exists(), f
    assert len(read_jsonl(mid / "labels.jsonl")) == n == results["data"]["n_gt"]  # it labels the gt split
    labels = {s: (root / s / "labels.jsonl").exists() for s in stages}  # the labellers: weak (w2s), intermediate (gt)
    assert labels == {"weak": True, "strong": False, "intermediate": True, "student-none": False}
    assert len(read_jsonl(root / "weak" / "labels.jsonl")) == n == results["data"]["n_w2s"]
    for stage in stages:
        assert results["models"][stage]["n_train"] == n
        assert read_jsonl(root / stage / "metrics.jsonl")[-1]["examples_seen"] == n
        preds = read_jsonl(root / stage / "predictions.jsonl")
        assert results["models"][stage]["implicit_accuracy"] == pytest.approx(
            sum(r["implicit_margin"] > 0 for r in preds) / n)
    assert_results_match_predictions(root, results, stages=("weak", "strong", "student-none"), n_test=n)


@pytest.fixture(scope="module")
def simpo_labelled(data_dir, tmp_path_factory):
    """A small SimPO run (settings none): its weak labels set the --conf_threshold of the tests below, which
    re-run it in the same folder (the ceilings come from the cache: the filter is the students' alone)."""
    out = tmp_path_factory.mktemp("simpo-conf")
    args = po_argv(data_dir, out, "--settings", "none", n=32, n_extra=0)
    simpo_w2s.main(args)
    root = run_root(out, "simpo")
    confidences = [sigmoid_abs(r["margin"]) for r in read_jsonl(root / "weak" / "labels.jsonl")]
    return {"argv": args, "root": root, "confidences": confidences}


def test_simpo_conf_threshold_trains_on_the_confident_pairs(simpo_labelled, capsys):
    """SimPO's confidence is sigmoid(|mean-log-prob margin|); a threshold between two of them keeps part."""
    root, confidences = simpo_labelled["root"], simpo_labelled["confidences"]
    distinct = sorted(set(confidences))
    assert len(distinct) >= 2
    mid = len(distinct) // 2
    threshold = (distinct[mid - 1] + distinct[mid]) / 2
    kept = sum(c >= threshold for c in confidences)
    assert 0 < kept < len(confidences)
    print(f"--conf_threshold {threshold}: keeps {kept}/{len(confidences)} weak labels")
    capsys.readouterr()
    results = simpo_w2s.main(simpo_labelled["argv"] + ["--conf_threshold", repr(threshold)])
    root = Path(results["run_dir"])  # another configuration: another folder, the ceilings copied from the first
    out = capsys.readouterr().out
    assert "[weak] cached" in out and "[strong] cached" in out and "[student-none] cached" not in out
    assert results["config"]["conf_threshold"] == threshold
    assert results["models"]["student-none"]["n_train"] == kept
    for log in ("metrics.jsonl", "sft_metrics.jsonl"):
        assert read_jsonl(root / "student-none" / log)[-1]["examples_seen"] == kept
    assert_results_match_predictions(root, results, stages=("weak", "strong", "student-none"), n_test=32)


def test_simpo_conf_threshold_keeping_nothing_exits(simpo_labelled):
    top = max(simpo_labelled["confidences"])
    threshold = (top + 1) / 2
    assert top < threshold < 1
    with pytest.raises(SystemExit) as exit_info:
        simpo_w2s.main(simpo_labelled["argv"] + ["--conf_threshold", repr(threshold)])
    message = str(exit_info.value)
    assert "no labelled pair" in message and "--conf_threshold" in message and f"{top:.3f}" in message, message


# ---- the toy testbed (make demo)

def test_toy_generator_facts_match_tokenization(tmp_path):
    """Each toy word is one token and TOY_TAIL_TOKENS follow the request, so `toy_visible` (the generator's own
    per-pair record) says exactly whether the cue survives the weak model's left truncation."""
    pools = toy.make_toy_pairs({"gt": 300, "w2s": 300, "test": 300}, 100, seed=3)
    again = toy.make_toy_pairs({"gt": 300, "w2s": 300, "test": 300}, 100, seed=3)
    assert pools == again, "the toy data must be deterministic from the seed"
    texts = [t for s in ("gt", "w2s", "test") for p in pools[s] for t in (p["chosen"], p["rejected"])]
    tok = common.load_tokenizer(toy.build_tiny("tiny:1x32", texts, tmp_path, seed=0))
    test = pools["test"]
    assert 0.4 < sum(p["harmful"] for p in test) / len(test) < 0.6
    assert all(p["chosen"].endswith(toy.TOY_REFUSE if p["harmful"] else toy.TOY_COMPLY) for p in test)
    assert all(p["chosen"].endswith(toy.TOY_COMPLY) for p in pools["extra"]), "helpful answers comply"
    assert any(p["harmful"] for p in pools["extra"]), "the conflict: some helpful pairs comply with harm"
    for eos, weak_max_len in ((False, 13), (True, 14)):
        enc = common.encode_texts(tok, [p["chosen"] for p in test], weak_max_len, eos=eos)
        cue_words = set(toy.TOY_HARMFUL + toy.TOY_HARMLESS)
        for p, (ids, _) in zip(test, enc):
            seen = {tok.decode([i]).strip() for i in ids} & cue_words
            assert bool(seen) == toy.toy_visible(p, weak_max_len, eos), (p, tok.convert_ids_to_tokens(ids))
        visible = sum(toy.toy_visible(p, weak_max_len, eos) for p in test) / len(test)
        assert abs(visible - 8 / 25) < 0.07, "the weak model sees the last 8 of 25 words"


def test_toy_knowledge_areas_match_the_generator(tmp_path):
    """DS is correct by construction. On the toy task the generator knows which test pairs the weak model
    cannot see (cue outside its last 8 words); the strong model sees everything. The report's areas must
    agree with that truth up to the models' own errors:
      - visible pairs are weak-known up to the weak ceiling's error on them (tolerance 0.05: it learns the
        visible cue to >= 95% when training converges, as measured on several seeds);
      - on invisible pairs the weak ceiling can only guess: accuracy 0.5 +- 0.1 (about 4 binomial standard
        deviations at ~1000 pairs, plus a small learnt bias towards one answer);
      - the strong ceiling errs on at most 5% of pairs, so weak-unknown & strong-known is the invisible pairs
        the weak model guessed wrong, within that 5%."""
    n = 1500
    results = rm_w2s.main(["--data", "toy", "--n_gt", str(n), "--n_w2s", "200", "--n_test", str(n), "--n_extra", "0",
                           "--weak", "tiny:1x32", "--strong", "tiny:2x64", "--weak_max_len", "13", "--lr", "2e-3",
                           "--epochs", "4", "--settings", "none", "--out_dir", str(tmp_path), "--log_every", "1000",
                           "--warmup_ratio", "0.05"])  # from scratch, the weak model needs a warm-up to learn at all
    root = Path(results["run_dir"])
    test = toy.make_toy_pairs({"gt": n, "w2s": 200, "test": n}, 0, seed=0)["test"]
    weak = [r["correct"] for r in read_jsonl(root / "weak" / "predictions.jsonl")]
    strong = [r["correct"] for r in read_jsonl(root / "strong" / "predictions.jsonl")]
    visible = [toy.toy_visible(p, 13, eos=False) for p in test]
    n_vis = sum(visible)
    weak_err_visible = sum(v and not w for v, w in zip(visible, weak)) / n_vis
    weak_acc_hidden = sum(w for v, w in zip(visible, weak) if not v) / (n - n_vis)
    strong_err = 1 - sum(strong) / n
    print(f"visible {n_vis}/{n}; weak error on visible {weak_err_visible:.3f}, weak accuracy on hidden "
          f"{weak_acc_hidden:.3f}; strong error {strong_err:.3f}")
    assert weak_err_visible <= 0.05
    assert abs(weak_acc_hidden - 0.5) <= 0.1
    assert strong_err <= 0.05
    areas = results["students"]["none"]["areas"]
    truth_wu_sk = sum(not v and not w for v, w in zip(visible, weak))  # hidden and guessed wrong
    assert abs(areas["weak-unknown & strong-known"]["n"] - truth_wu_sk) <= 0.05 * n
    assert areas["weak-known & strong-known"]["n"] + areas["weak-known & strong-unknown"]["n"] >= (1 - 0.05) * n_vis


def test_reduced_make_demo(tmp_path):
    """`make demo` end to end on fewer pairs and a shorter pretraining: three reports, printed in order."""
    import subprocess
    import sys
    out = subprocess.run(["make", "demo", f"PY={sys.executable}", "DEMO_N=96", "DEMO_N_RM=96", "DEMO_STRONG=tiny:2x64+pt20",
                          f"DEMO_DIR={tmp_path}", "ARGS=--batch_size 16 --micro_batch 8"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    tail = out.stdout[out.stdout.index("# Reward modeling"):]
    assert tail.index("# Reward modeling") < tail.index("# DPO") < tail.index("# SimPO")
    for method in ("rm", "dpo", "simpo"):
        root = next(tmp_path.glob(f"{method}-toy-*-s0-*"))
        results = json.loads((root / "results.json").read_text())
        assert set(results["students"]) == {"none", "implicit", "explicit"}
        assert "ΔDS" in (root / "report.md").read_text()
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())  # the demo ends with the sweep's figures
    assert len(summary["runs"]) == 3 and summary["figures"] and (tmp_path / "sweep" / "sweep.md").exists()
    assert all((tmp_path / "sweep" / f["file"]).stat().st_size > 0 for f in summary["figures"])


def test_bench_reports_throughput(data_dir, tmp_path):
    """`make bench`'s reward-model line on the fixed workload: every number present and sane (that grouping
    pads less is test_data.py's make_batches test)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with mock.patch.object(tempfile, "tempdir", str(tmp)):
        row = rm_w2s.main(["--bench", "--data", str(data_dir), "--out_dir", str(tmp_path)])
    # torch's own compile cache (torchinductor_<user>, made when torch._dynamo is first imported) is not the bench's
    left = [f for f in tmp.iterdir() if not f.name.startswith("torchinductor_")]
    assert not left, "the bench leaves no temporary folder behind"
    assert row["pairs_per_s"] > 0 and row["real_tokens_per_s"] > 0 and row["peak_memory_gib"] > 0
    assert 0 <= row["padding_share"] < 0.5
    assert 3.5e6 < row["params"] < 4.5e6, "a 4-layer GPT-2 of width 256 with a 2048-token vocabulary"
    # 4 blocks of 12 * 256^2 weights (+ norms and biases); the token and position embeddings are left out
    assert 3.1e6 < row["non_embedding_params"] < 3.3e6
    assert row["precision"] == common.resolve_precision("auto")
    assert row["train_flops_per_s"] == pytest.approx(6 * row["non_embedding_params"] * row["real_tokens_per_s"])
    assert row["peak_fraction"] == pytest.approx(row["train_flops_per_s"] / row["matmul_peak_flops_per_s"])
    assert row["peak_dtype"] == common.resolve_precision("auto")  # emulated bf16 is no peak: fp32's where it is
    assert 0 < row["peak_fraction"] < 1.5  # a shared machine's peak is measured, not given


def test_bench_model_random_builds_a_published_shape(data_dir, tmp_path, monkeypatch):
    """--bench_model random:NAME (make bench-gpu: random:gpt2-xl) builds a GPT-2 of that shape with random weights
    and the GPT-2 vocabulary, and benches it like any model; an unknown name is one line. A small shape stands in
    for gpt2-xl's 1.5B parameters here."""
    from tools import bench
    monkeypatch.setitem(bench.GPT2_SHAPES, "gpt2-test", (2, 64, 4))
    row = rm_w2s.main(["--bench", "--data", str(data_dir), "--out_dir", str(tmp_path), "--bench_model",
                       "random:gpt2-test", "--precision", "fp32"])
    config = json.loads((tmp_path / "models" / "random-gpt2-test" / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"], config["vocab_size"]) == (2, 64, 4, 50257)
    assert row["pairs_per_s"] > 0 and row["non_embedding_params"] < row["params"]
    with pytest.raises(SystemExit, match="random:NAME takes one of gpt2-medium, gpt2-large, gpt2-xl"):
        bench.random_model("gpt2-huge", ["a text"], tmp_path)


def test_bench_model_takes_the_first_k_spelling(data_dir, tmp_path):
    """--bench_model NAME:firstK is the model cut to its first K layers (converted once under <out_dir>/models),
    as for --weak and --strong; a plain path is timed as it is."""
    from tools import bench
    from transformers import AutoConfig
    texts = ["\n\nHuman: hi\n\nAssistant: hello there", "\n\nHuman: bye\n\nAssistant: goodbye"]
    tiny = toy.build_tiny("tiny:2x32", texts, tmp_path / "models", seed=0)
    args = rm_w2s.Args(data=str(data_dir), out_dir=str(tmp_path / "bench"), bench=True, bench_model=f"{tiny}:first1")
    pairs, path = bench.workload(args)
    gt = common.read_jsonl(data_dir / "harmless_train_gt.jsonl")  # the synthetic file has fewer than 256 pairs
    assert pairs == gt[:bench.BENCH_PAIRS] and Path(path).parent == tmp_path / "bench" / "models"
    assert AutoConfig.from_pretrained(path).num_hidden_layers == 1
    assert bench.workload(dataclasses.replace(args, bench_model=tiny))[1] == tiny


def test_cache_key_follows_the_data_files(data_dir, tmp_path, capsys):
    """A stage's cache key holds what it reads: a data file edited in place (same path, same options) must not reuse the cached stages."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    args = ["--data", str(data), "--n_gt", "16", "--n_w2s", "16", "--n_test", "16", "--n_extra", "0",
            "--weak", "tiny:1x32", "--strong", "tiny:1x32", "--settings", "none", "--out_dir", str(tmp_path / "runs"),
            "--batch_size", "8", "--micro_batch", "8"]
    rm_w2s.main(args)
    rm_w2s.main(args)
    assert capsys.readouterr().out.count("cached in") == 3
    rows = (data / "harmless_test.jsonl").read_text().splitlines()
    (data / "harmless_test.jsonl").write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # same texts, new order
    rm_w2s.main(args)
    assert "cached in" not in capsys.readouterr().out


# ---- runs that must not exit 0 with invalid numbers, folders shared by configurations, the stage cache

def small_argv(data_dir, out_dir, *extra, helpful=""):
    return ["--data", str(data_dir), "--n_gt", "16", "--n_w2s", "16", "--n_test", "16", "--n_extra", "8", "--helpful", str(helpful),
            "--weak", "tiny:1x32", "--strong", "tiny:1x32", "--out_dir", str(out_dir), "--batch_size", "8",
            "--micro_batch", "4", "--lr", "1e-3", *extra]


def test_nan_loss_stops_the_run_naming_stage_and_step(data_dir, tmp_path):
    with pytest.raises(SystemExit) as info:
        rm_w2s.main(small_argv(data_dir, tmp_path, "--lr", "1e12", "--settings", "none", "--batch_size", "4"))
    message = str(info.value)
    assert message.startswith("error: [weak] the loss is nan at step ") and "\n" not in message, message
    root = run_root(tmp_path)
    assert not (root / "weak" / "stage.json").exists() and not (root / "results.json").exists()


@pytest.mark.parametrize("method", ["rm", "dpo"])
def test_texts_cut_to_max_len_are_counted_per_stage_and_split(method, long_data_dir, tmp_path):
    """A text longer than --max_len is cut (encode_texts); each stage says how many of each split it read were,
    in results.json and the report, counted here by encoding every text whole."""
    module, data_dir = {"rm": rm_w2s, **PO}[method], long_data_dir
    results = module.main(small_argv(data_dir, tmp_path, "--settings", "none", "--max_len", "40", "--weak_max_len",
                                     "24", *(["--epochs", "1"] if method != "rm" else [])))
    root = Path(results["run_dir"])
    tok = common.load_tokenizer(next(p for p in (tmp_path / "models").iterdir()))
    splits = common.load_splits(module.Args(data=str(data_dir), n_gt=16, n_w2s=16, n_test=16, n_extra=0))[0]
    eos = method != "rm"  # DPO and SimPO append an EOS to each response

    def cut(pairs, max_len):
        texts = [t for p in pairs for t in (p["chosen"], p["rejected"])]
        return sum(len(e.ids) > max_len for e in common.encode_texts(tok, texts, 10**9, eos))
    weak = results["models"]["weak"]["cut"]
    assert weak == {"train": cut(splits["gt"], 24), "test": cut(splits["test"], 24), "labels": cut(splits["w2s"], 24)}
    assert results["models"]["strong"]["cut"] == {"train": cut(splits["gt"], 40), "test": cut(splits["test"], 40)}
    assert weak["test"] > results["models"]["strong"]["cut"]["test"] > 0  # the shorter window cuts more
    report = (root / "report.md").read_text()
    assert f"weak train {weak['train']}, test {weak['test']}, labels {weak['labels']}" in report


def test_divergence_is_reported(data_dir, tmp_path, capsys):
    results = rm_w2s.main(small_argv(data_dir, tmp_path, "--lr", "1e3", "--settings", "none"))
    assert results["valid"] is False
    assert any(n.startswith("weak diverged (metrics.jsonl: loss 0.6931 at the first step") for n in results["notes"])
    assert "warning: [weak] training diverged" in capsys.readouterr().out
    assert "These numbers are not valid" in (Path(results["run_dir"]) / "report.md").read_text()


def test_stages_rerun_exactly_when_what_they_read_changes(data_dir, helpful, tmp_path, capsys, monkeypatch):
    """--settings and --alpha reach only the students that read them; a change of code re-runs everything."""
    zeroth = rm_w2s.main(small_argv(data_dir, tmp_path, "--settings", "none,explicit"))
    capsys.readouterr()
    first = rm_w2s.main(small_argv(data_dir, tmp_path, "--settings", "none,implicit,explicit", helpful=helpful))
    out = capsys.readouterr().out
    assert all(f"[{s}] cached" in out for s in ("weak", "strong", "student-none", "student-explicit"))
    assert "[student-implicit] cached" not in out
    second = rm_w2s.main(small_argv(data_dir, tmp_path, "--settings", "none,explicit", "--alpha", "0.9"))
    out = capsys.readouterr().out
    assert second["run_dir"] != first["run_dir"]  # another configuration, another folder
    # Both earlier folders hold these stages; which one is copied depends on the folders' names (hashes).
    earlier = (zeroth["run_dir"], first["run_dir"])
    assert all(any(f"[{s}] cached in {d}/{s}" in out for d in earlier) for s in ("weak", "strong", "student-none"))
    assert "[student-explicit] cached" not in out
    assert second["models"]["student-none"] == first["models"]["student-none"]

    real = runs.code_digest
    monkeypatch.setattr(runs, "code_digest", lambda files: {**real(files), "code": "edited"})
    third = rm_w2s.main(small_argv(data_dir, tmp_path, "--settings", "none,explicit", "--alpha", "0.9"))
    assert "cached" not in capsys.readouterr().out
    assert {m["code"] for m in third["models"].values()} == {"edited"}
    assert "that computed each stage: weak edited" in (Path(third["run_dir"]) / "report.md").read_text()


def test_replaced_local_weights_rerun_the_stages(data_dir, tmp_path, capsys):
    rm_w2s.main(small_argv(data_dir, tmp_path / "runs", "--settings", "none"))
    [built] = [p for p in (tmp_path / "runs" / "models").iterdir()]
    local = tmp_path / "local-model"
    shutil.copytree(built, local)
    args = small_argv(data_dir, tmp_path / "runs", "--settings", "none", "--weak", str(local))
    rm_w2s.main(args)
    capsys.readouterr()
    rm_w2s.main(args)
    assert "[weak] cached" in capsys.readouterr().out
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(local)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    model.save_pretrained(local)  # other weights, same path
    rm_w2s.main(args)
    out = capsys.readouterr().out
    assert "[weak] cached" not in out and "[strong] cached" in out


def test_a_second_live_run_in_a_folder_is_refused_and_a_killed_one_leaves_no_lock(data_dir, tmp_path):
    import subprocess
    import sys
    args = rm_w2s.Args(data=str(data_dir), out_dir=str(tmp_path), weak="tiny:1x32", strong="tiny:1x32")
    root, lock = runs.open_run(args, "rm")
    with pytest.raises(SystemExit, match=f"another run \\(pid {os.getpid()}\\) is using {root}"):
        runs.open_run(args, "rm")
    lock.close()
    code = ("import sys, os, signal, rm_w2s, runs; a = rm_w2s.Args(data=sys.argv[1], out_dir=sys.argv[2], "
            "weak='tiny:1x32', strong='tiny:1x32'); runs.open_run(a, 'rm'); os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code, str(data_dir), str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == -9
    root, lock = runs.open_run(args, "rm")  # the dead process's lock is gone with it
    lock.close()


def test_report_always_belongs_to_the_config_beside_it(tmp_path):
    args = rm_w2s.Args(data="toy", out_dir=str(tmp_path))
    root = runs.run_dir(args, "rm")
    root.mkdir(parents=True)
    for stale in ("results.json", "report.md"):
        (root / stale).write_text("from an earlier run")
    root, lock = runs.open_run(args, "rm")
    lock.close()
    assert not (root / "results.json").exists() and not (root / "report.md").exists()
    assert json.loads((root / "config.json").read_text()) == dataclasses.asdict(args)
    other = runs.run_dir(dataclasses.replace(args, lr=1e-3), "rm")
    assert other != root and other.name.startswith("rm-toy-gpt2-gpt2-medium-s0-")
    assert runs.run_dir(dataclasses.replace(args, micro_batch=2, settings="none"), "rm") == root


def test_empty_test_file_stops_before_training(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "harmless_test.jsonl").write_text("")
    with pytest.raises(SystemExit, match="error: no usable pairs for the test split in .*harmless_test.jsonl"):
        rm_w2s.main(small_argv(data, tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_sft_and_preference_schedules_are_the_papers(po_run):
    """SFT at the preference stage's lr (0: --lr), warm-up then constant, for DPO and SimPO alike."""
    cfg = po_run["results"]["config"]
    for log, lr in (("sft_metrics.jsonl", cfg["sft_lr"] or cfg["lr"]), ("metrics.jsonl", cfg["lr"])):
        rows = read_jsonl(po_run["root"] / "student-none" / log)
        assert [r["lr"] for r in rows] == pytest.approx(
            [common.lr_at(i, len(rows), lr, cfg["warmup_ratio"], "constant") for i in range(len(rows))])


@pytest.mark.parametrize("method", ["rm", "dpo", "simpo"])
def test_eval_every_changes_no_training_and_ends_at_the_report(method, data_dir, tmp_path):
    """--eval_every scores each student on the test split during training (eval_curve.jsonl): the training
    curves and final predictions equal a run without it, and the last curve point is the final report."""
    module = {"rm": rm_w2s, **PO}[method]
    base = small_argv(data_dir, tmp_path, "--settings", "none,explicit", *(["--epochs", "1"] if method != "rm" else []))
    plain = module.main(base)
    curved = module.main(base + ["--eval_every", "1"])
    assert curved["run_dir"] != plain["run_dir"]
    for setting in ("none", "explicit"):
        a, b = Path(plain["run_dir"]) / f"student-{setting}", Path(curved["run_dir"]) / f"student-{setting}"
        assert read_jsonl(a / "predictions.jsonl") == read_jsonl(b / "predictions.jsonl")
        assert read_jsonl(a / "metrics.jsonl") == read_jsonl(b / "metrics.jsonl")
        curve = read_jsonl(b / "eval_curve.jsonl")
        assert not (a / "eval_curve.jsonl").exists()
        assert [r["step"] for r in curve] == [r["step"] for r in read_jsonl(b / "metrics.jsonl")]
        student = curved["students"][setting]
        assert curve[-1]["accuracy"] == student["accuracy"] and curve[-1]["ds"] == student["ds"]
        assert curve[-1]["areas"] == {k: v["student_error"] for k, v in student["areas"].items()}
    assert not (Path(curved["run_dir"]) / "weak" / "eval_curve.jsonl").exists()  # ceilings are not students


# ---- copying works: the three files of `make rm` (or `make dpo`, `make simpo`), alone in an empty folder, run it


@pytest.mark.parametrize("script", ["rm_w2s.py", "dpo_w2s.py", "simpo_w2s.py"])
def test_each_experiment_runs_from_a_copy_of_its_three_files(script, data_dir, tiny, tiny_llama, tmp_path):
    """Copying works, as the README's file table says: the method's script, common.py and runs.py, copied alone
    into an empty folder, run its experiment there. The run is a subprocess started in that folder with
    PYTHONPATH unset, so no other file of this repository can be imported; its models are local tiny folders
    (conftest's GPT-2 and Llama), so it needs neither toy.py nor pretrained.py."""
    import subprocess
    import sys
    files = (script, "common.py", "runs.py")
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in files:
        shutil.copy(Path(__file__).resolve().parents[1] / name, folder / name)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, script, "--data", str(data_dir), "--weak", tiny, "--strong", tiny_llama,
         "--n_gt", "16", "--n_w2s", "16", "--n_test", "16", "--n_extra", "0", "--settings", "none,explicit",
         "--batch_size", "8", "--micro_batch", "4", "--lr", "1e-3", "--epochs", "1", "--out_dir", "runs"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    root = run_root(folder / "runs", script.split("_")[0])
    results = json.loads((root / "results.json").read_text())
    assert set(results["students"]) == {"none", "explicit"}
    assert set(results["models"]) == {"weak", "strong", "student-none", "student-explicit"}
    assert all(model["n"] == 16 for model in results["models"].values())
    # nothing else was needed, nor written beside the three files but the run folders and Python's byte-code cache
    assert sorted(p.name for p in folder.iterdir() if p.name not in ("runs", "__pycache__")) == sorted(files)
    assert not {"toy.py", "bench.py", "pretrained.py", "sweep.py"} & {p.name for p in folder.rglob("*.py")}


@pytest.mark.parametrize("damage", ["stage.json", "predictions.jsonl"])
def test_a_damaged_stage_is_rerun_with_one_line(data_dir, tmp_path, capsys, damage):
    """A finished stage whose stage.json is half-written, or whose predictions no longer match what stage.json
    recorded (a copy cut at a line end), is re-run, saying so in one line; never read, never a traceback."""
    first = rm_w2s.main(small_argv(data_dir, tmp_path, "--settings", "none"))
    weak = Path(first["run_dir"]) / "weak"
    if damage == "stage.json":
        (weak / "stage.json").write_text('{"key": ')
        expected = f"warning: {weak / 'stage.json'} is damaged (not a stage summary): the stage is treated as unfinished"
    else:
        rows = (weak / "predictions.jsonl").read_text().splitlines()
        (weak / "predictions.jsonl").write_text("\n".join(rows[:-1]) + "\n")
        expected = (f"warning: {weak / 'predictions.jsonl'} is missing or differs from what {weak / 'stage.json'} "
                    "recorded: the stage is treated as unfinished")
    capsys.readouterr()
    second = rm_w2s.main(small_argv(data_dir, tmp_path, "--settings", "none"))
    out = capsys.readouterr().out
    assert expected in out.splitlines()
    assert "[weak] cached" not in out and "[strong] cached" in out
    assert len(read_jsonl(weak / "predictions.jsonl")) == 16 and json.loads((weak / "stage.json").read_text())["files"]
    assert second["models"]["weak"] == first["models"]["weak"]  # re-trained to the same numbers


def test_precision_is_in_the_config_the_report_and_every_stage_key(data_dir, tmp_path, capsys):
    """--precision auto is resolved to what the machine runs (bf16 where it is native) before anything else, and
    that choice is printed and written into config.json, the report and every stage's key: fp32 and bf16 runs
    never share a folder or a cached stage."""
    results = {p: rm_w2s.main(small_argv(data_dir, tmp_path, "--settings", "none", "--precision", p))
               for p in ("fp32", "bf16", "auto")}
    out = capsys.readouterr().out
    assert "[rm] precision bf16 (bf16 autocast over fp32 weights" in out and "[rm] precision fp32" in out
    native = common.resolve_precision("auto")
    for p, r in results.items():
        config = json.loads((Path(r["run_dir"]) / "config.json").read_text())
        assert config["precision"] == (native if p == "auto" else p)
        assert f"Options: precision={config['precision']}," in (Path(r["run_dir"]) / "report.md").read_text()
    assert results["fp32"]["run_dir"] != results["bf16"]["run_dir"]
    keys = {p: json.loads((Path(r["run_dir"]) / "weak" / "stage.json").read_text())["key"] for p, r in results.items()}
    assert keys["fp32"] != keys["bf16"] and keys["auto"] == keys[native]


# ---- calibrate.py: a ceiling's learning rate chosen on a validation split the test split never sees

def test_calibration_trains_on_gt_scores_a_held_out_part_and_summarizes_its_files(data_dir, tmp_path, monkeypatch):
    from tools import calibrate
    monkeypatch.setattr(calibrate, "N_TRAIN", 16)
    monkeypatch.setattr(calibrate, "N_VAL", 8)
    monkeypatch.chdir(tmp_path)  # its validation files go to runs/calibration-data, under the working folder
    out = tmp_path / "calibration"
    calibrate.calibrate(["--data", str(data_dir), "--weak", "tiny:1x32", "--lr", "1e-3", "--batch_size", "8",
                         "--micro_batch", "4", "--out_dir", str(out)])
    [stage] = list(out.glob("*/weak/stage.json"))
    config = json.loads((stage.parent.parent / "config.json").read_text())
    gt = common.read_pairs(Path(data_dir) / "harmless_train_gt.jsonl")
    val = common.read_pairs(Path(config["data"]) / "harmless_test.jsonl")
    assert val == gt[-8:] and not {p["chosen"] for p in val} & {p["chosen"] for p in gt[:16]}
    margins = [row["margin"] for row in common.read_jsonl(stage.parent / "predictions.jsonl")]
    assert len(margins) == 8
    calibrate.summarize(out)
    row = (out / "calibration.md").read_text().splitlines()[-1]
    p = [1 / (1 + math.exp(-m)) for m in margins]
    assert row.startswith(f"| tiny:1x32 | 0.001 | {sum(m > 0 for m in margins) / 8:.3f} [")
    assert f"| {sum(abs(x - 0.5) for x in p) / 8:.3f} | {sum(abs(x - 0.5) > 0.1 for x in p) / 8:.3f} |" in row
    with open(stage.parent / "predictions.jsonl", "a") as f:  # a damaged stage is left out of the table, not read
        f.write('{"index": 8, "margin": 9.0, "correct": true}\n')
    assert not [line for line in calibrate.summary(out).splitlines() if line.startswith("| tiny:1x32")]


def test_report_says_how_informative_each_labellers_labels_are(full_run):
    """A student can learn only what its labels carry: the report and results.json give, for each stage that
    labels (the weak ceiling here), the margin scale, mean |p - 0.5| and the share of p beyond 0.1 from 0.5."""
    margins = [row["margin"] for row in read_jsonl(full_run["root"] / "weak" / "labels.jsonl")]
    p = [1 / (1 + math.exp(-m)) for m in margins]
    labels = full_run["results"]["models"]["weak"]["labels"]
    assert labels["mean_abs_p"] == pytest.approx(sum(abs(x - 0.5) for x in p) / len(p))
    assert labels["share_beyond_0.1"] == sum(abs(x - 0.5) > 0.1 for x in p) / len(p)
    assert "labels" not in full_run["results"]["models"]["strong"]  # the strong ceiling labels nothing
    assert f"mean |p − 0.5| {labels['mean_abs_p']:.3f}" in (full_run["root"] / "report.md").read_text()


@pytest.mark.parametrize("method", [rm_w2s, dpo_w2s, simpo_w2s])
def test_student_seed_trains_only_a_student_in_another_order(method, data_dir, tmp_path):
    """--student_seed K: a second no-conflict student that differs from the first only in its data order (issue:
    the churn that needs no conflict). The ceilings are the first run's, copied from its folder, not re-trained;
    the student reads the same pairs and labels in another order."""
    base = small_argv(data_dir, tmp_path, "--settings", "none", "--precision", "fp32", "--batch_size", "4",
                      "--micro_batch", "2")  # 4 steps: two seeds' orders differ (2 steps may keep the same order)
    first = method.main(base)
    second = method.main(base + ["--student_seed", "7"])
    assert first["run_dir"] != second["run_dir"]
    one, two = Path(first["run_dir"]), Path(second["run_dir"])
    for stage in ("weak", "strong"):  # found in the sibling folder by key: the same predictions, not trained again
        assert (one / stage / "predictions.jsonl").read_bytes() == (two / stage / "predictions.jsonl").read_bytes()
        assert (one / stage / "metrics.jsonl").read_bytes() == (two / stage / "metrics.jsonl").read_bytes()
    curves = [read_jsonl(d / "student-none" / "metrics.jsonl") for d in (one, two)]
    assert len(curves[0]) == len(curves[1]) and curves[0] != curves[1], "another order, another training curve"
    with pytest.raises(SystemExit, match="student_seed"):
        method.main(base + ["--student_seed", "-2"])
