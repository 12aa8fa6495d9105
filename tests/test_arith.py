"""The arithmetic testbed (`--data arith`, arith.py): splits disjoint by question, determinism from the seed, the
near-miss rule, the tier mix, no length or size shortcut, and tiny end-to-end runs (about 20 s on a 2-core CPU)."""
import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

import arith
import common
import dpo_w2s
import rm_w2s
import runs
from test_e2e import read_jsonl, run_root

QUESTION = re.compile(r"\n\nHuman: What is (\d+) ([-+*]) (\d+)\?\n\nAssistant: The answer is (\d+)\.$")


def parse(text):
    """(a, op, b, answer) of one arith text."""
    a, op, b, answer = QUESTION.fullmatch(text).groups()
    return int(a), op, int(b), int(answer)


def question(pair):
    """A pair's question, the operands of + and * unordered (47 + 38 and 38 + 47 are one question)."""
    a, op, b, _ = parse(pair["chosen"])
    return (op, a, b) if op == "-" else (op, *sorted((a, b)))


def split_args(n, data="arith", **kw):
    return SimpleNamespace(**{"data": data, "n_gt": n, "n_w2s": n, "n_test": n, "n_extra": 0,
                              "settings": "none,explicit", "seed": 0, "helpful": "", **kw})


def test_splits_disjoint_by_question():
    """gt, w2s, test and the validation split (arith:val's test) share no question, and load_splits drops nothing;
    arith:val has the same gt and w2s splits as arith, so calibration trains on the run's own gt pairs."""
    n = 900
    splits, stats = common.load_splits(split_args(n))
    val, val_stats = common.load_splits(split_args(n, data="arith:val", n_test=arith.VAL_PER_TIER * len(arith.TIERS)))
    assert stats["dropped"] == {} == val_stats["dropped"] and stats["short"] == {} == val_stats["short"]
    assert val["gt"] == splits["gt"] and val["w2s"] == splits["w2s"]
    config = {"data": "arith", "n_gt": n, "n_w2s": n, "n_test": n, "seed": 0}
    assert arith.tiers_of_test_split(config) == [p["tier"] for p in splits["test"]]  # a run's test order
    assert arith.tiers_of_run(config) == arith.tiers_of_test_split(config)
    assert arith.tiers_of_run({**config, "data": "toy"}) is None  # another source has no tiers
    questions = {"gt": splits["gt"], "w2s": splits["w2s"], "test": splits["test"], "val": val["test"]}
    questions = {name: [question(p) for p in pairs] for name, pairs in questions.items()}
    for name, qs in questions.items():
        assert len(set(qs)) == len(qs), f"{name} repeats a question"
    names = list(questions)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(questions[a]) & set(questions[b]), f"{a} and {b} share a question"


def test_deterministic_from_the_seed():
    """Same seed, same pairs; another seed, other pairs. gt does not move with the sizes of the later splits, and
    the validation split with none of them."""
    n = {"gt": 200, "w2s": 200, "test": 200}
    pools = arith.make_arith_pairs(n, seed=3)
    assert pools == arith.make_arith_pairs(n, seed=3)
    other = arith.make_arith_pairs(n, seed=4)
    for split in n:
        assert len({p["chosen"] for p in pools[split]} & {p["chosen"] for p in other[split]}) < 0.05 * n[split]
    bigger = arith.make_arith_pairs({"gt": 200, "w2s": 500, "test": 1000}, seed=3)
    assert bigger["gt"] == pools["gt"]
    val_small = arith.make_arith_pairs({"gt": 10, "w2s": 10, "test": 100}, seed=3, validation=True)["test"]
    val_big = arith.make_arith_pairs({"gt": 300, "w2s": 50, "test": 100}, seed=3, validation=True)["test"]
    assert val_small == val_big


def test_near_miss_rule():
    """chosen is the right answer; rejected is a near miss (an offset of NEAR_MISS_OFFSETS) with the same number
    of digits, within the tier's answers; both answer the same question."""
    pools = arith.make_arith_pairs({"gt": 1000, "w2s": 1000, "test": 3000}, seed=0)
    offsets = Counter()
    for pair in (p for pairs in pools.values() for p in pairs):
        a, op, b, right = parse(pair["chosen"])
        a2, op2, b2, miss = parse(pair["rejected"])
        assert (a, op, b) == (a2, op2, b2)
        assert right == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert op == arith.TIERS[pair["tier"]][0]
        assert miss != right and len(str(miss)) == len(str(right)) >= 2
        low, high = arith.answer_range(pair["tier"])
        assert low <= miss <= high
        offsets[miss - right] += 1
    assert set(offsets) == set(arith.NEAR_MISS_OFFSETS)


def test_tier_counts():
    """Every split holds the tiers in equal shares (the first n % 5 tiers one more), mixed in its order."""
    pools = arith.make_arith_pairs({"gt": 32, "w2s": 1000, "test": 2003}, seed=0)
    assert arith.tier_counts(32) == {"add2": 7, "add3": 7, "sub3": 6, "mul31": 6, "mul22": 6}
    for split, pairs in pools.items():
        assert Counter(p["tier"] for p in pairs) == arith.tier_counts(len(pairs)), split
    tiers = [p["tier"] for p in pools["test"]]
    assert sum(a != b for a, b in zip(tiers, tiers[1:])) > 0.6 * len(tiers)  # shuffled, not in blocks


def test_no_length_or_size_shortcut():
    """"Prefer the shorter response" decides no pair: every pair has equal lengths, so the rule is a coin at
    0.5 (the report scores the undecided pairs as wrong and says how many there are). "Prefer the smaller
    number" sits near 0.5 overall and in each tier."""
    pairs = arith.make_arith_pairs({"gt": 10, "w2s": 10, "test": 5000}, seed=0)["test"]
    assert common.length_rule(pairs) == [None] * len(pairs)
    smaller = [parse(p["chosen"])[3] < parse(p["rejected"])[3] for p in pairs]
    assert abs(sum(smaller) / len(smaller) - 0.5) < 0.03
    for tier in arith.TIERS:
        in_tier = [s for s, p in zip(smaller, pairs) if p["tier"] == tier]
        assert abs(sum(in_tier) / len(in_tier) - 0.5) < 0.06, tier


def test_refusals():
    """The implicit conflict has no helpfulness pairs here; sizes beyond a tier's questions or the validation
    split stop with one line."""
    with pytest.raises(SystemExit, match="implicit conflict is not defined"):
        common.load_splits(split_args(8, settings="none,implicit", n_extra=8))
    with pytest.raises(SystemExit, match="tier add2 holds 4095 distinct questions"):
        arith.make_arith_pairs({"gt": 4000, "w2s": 4000, "test": 12000}, seed=0)
    with pytest.raises(SystemExit, match="arith:val holds 2000 validation pairs"):
        arith.make_arith_pairs({"gt": 8, "w2s": 8, "test": 2001}, seed=0, validation=True)


def test_tier_key_passes_downstream():
    """The extra "tier" key changes no digest (a stage key reads the texts alone) and survives into a student's
    pairs; the encoded pairs are those of the bare texts."""
    pairs = arith.make_arith_pairs({"gt": 20, "w2s": 20, "test": 20}, seed=0)["w2s"]
    bare = [{"chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    assert runs.pairs_digest(pairs) == runs.pairs_digest(bare)
    labels = [{"margin": 1.0 if i % 2 else -1.0, "correct": bool(i % 2)} for i in range(len(pairs))]
    student_pairs, _ = common.student_data(labels, pairs)
    assert [p["tier"] for p in student_pairs] == [p["tier"] for p in pairs]


@pytest.mark.parametrize("module, method, title", [(rm_w2s, "rm", "# Reward modeling"), (dpo_w2s, "dpo", "# DPO")])
def test_end_to_end(module, method, title, tmp_path):
    """A tiny run on arith ends with a report; the report counts every test pair as equal length, and its
    predictions read per tier through tiers_of_test_split."""
    results = module.main(["--data", "arith", "--weak", "tiny:1x32", "--strong", "tiny:1x32", "--n_gt", "32",
                           "--n_w2s", "32", "--n_test", "32", "--settings", "none,explicit", "--precision", "fp32",
                           "--out_dir", str(tmp_path)])
    root = run_root(tmp_path, method)
    assert (root / "report.md").read_text().startswith(title)
    assert set(results["students"]) == {"none", "explicit"}
    assert (results["data"]["n_gt"], results["data"]["n_w2s"], results["data"]["n_test"]) == (32, 32, 32)
    assert results["data"]["dropped"] == {} and results["length_baseline"]["equal_length"] == 32
    tiers = arith.tiers_of_test_split(json.loads((root / "config.json").read_text()))
    assert Counter(tiers) == arith.tier_counts(32)
    preds = read_jsonl(Path(root) / "student-none" / "predictions.jsonl")
    assert len(preds) == len(tiers) == 32
