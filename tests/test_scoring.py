"""Scoring: the knowledge space, DS and PGR by hand; the weak labels (confidence, the confident subset, the
students' data, orientation by the labeller); the length baseline.
"""
import copy
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

import common
import rm_w2s
import runs


# ---- knowledge space, DS and PGR

def test_knowledge_space_hand_example():
    # pair:     0  1  2  3  4  5  6  7  8  9
    weak = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
    strong = [1, 1, 1, 0, 1, 1, 1, 0, 0, 0]
    student = [1, 0, 1, 1, 0, 1, 0, 1, 0, 0]
    # weak-known & strong-known    {0, 1, 2}: n 3, student wrong at 1        -> 1/3
    # weak-known & strong-unknown  {3, 9}:    n 2, student wrong at 9        -> 1/2
    # weak-unknown & strong-known  {4, 5, 6}: n 3, student wrong at 4 and 6  -> 2/3 = DS
    # weak-unknown & strong-unknown {7, 8}:   n 2, student wrong at 8        -> 1/2
    ks = common.knowledge_space(weak, strong, student)
    areas = ks["areas"]
    assert [areas[a]["n"] for a in common.AREAS] == [3, 2, 3, 2]
    assert [areas[a]["student_error"] for a in common.AREAS] == pytest.approx([1 / 3, 1 / 2, 2 / 3, 1 / 2])
    assert ks["ds"] == pytest.approx(2 / 3)
    assert ks["err_wk_sk"] == pytest.approx(1 / 3)
    # accuracies: weak 5/10, strong 6/10, student 5/10 -> PGR (0.5 - 0.5) / (0.6 - 0.5) = 0
    accs = [sum(x) / 10 for x in (student, weak, strong)]
    assert accs == [0.5, 0.5, 0.6] and common.pgr(*accs) == pytest.approx(0.0)


def test_knowledge_space_empty_area_and_lengths():
    ks = common.knowledge_space([True] * 4, [True, False, True, False], [True, True, False, False])
    for area in ("weak-unknown & strong-known", "weak-unknown & strong-unknown"):  # (areas also hold errors and ci)
        assert {k: ks["areas"][area][k] for k in ("n", "student_error")} == {"n": 0, "student_error": None}
    assert ks["ds"] is None and ks["err_wk_sk"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        common.knowledge_space([True], [True, False], [True, False])


def test_pgr():
    assert common.pgr(0.55, 0.5, 0.6) == pytest.approx(0.5)
    assert common.pgr(0.6, 0.5, 0.6) == pytest.approx(1.0)
    assert common.pgr(0.4, 0.5, 0.6) == pytest.approx(-1.0)
    assert common.pgr(0.7, 0.5, 0.6) == pytest.approx(2.0)
    assert common.pgr(0.9, 0.6, 0.6) is None  # strong == weak
    assert common.pgr(0.9, 0.7, 0.6) is None  # strong < weak


# ---- weak labels and the students' data

def test_confident_subset_reads_only_margins():
    margins = [0.1, -2.0, 3.0, -0.5, 0.0, 0.3]
    # confidence sigmoid(|m|): 0.525, 0.881, 0.953, 0.622, 0.5, 0.574
    assert common.confidence(margins).tolist() == pytest.approx([0.524979, 0.880797, 0.952574, 0.622459, 0.5, 0.574443],
                                                                abs=1e-6)
    assert common.confident_subset(margins, 0.6, gt_correct=None) == [1, 2, 3]
    assert common.confident_subset(margins, 0.9, gt_correct=None) == [2]
    assert common.confident_subset(margins, 0.0, gt_correct=None) == list(range(6))
    # only |margin| matters: whatever the labels' correctness, flipping every sign gives the same subset
    assert common.confident_subset([-m for m in margins], 0.6) == [1, 2, 3]
    assert common.confident_subset(torch.tensor(margins), 0.6) == [1, 2, 3]
    # the named GT option (--drop_weak_errors) also drops the weak model's errors
    assert common.confident_subset(margins, 0.6, gt_correct=[True, False, True, True, True, True]) == [2, 3]


def test_dpo_confidence_scale_is_the_papers():
    """DPO: sigmoid(summed log-ratio / 50); a summed ratio of 50 * ln 3 is confidence 0.75 (3 to 1)."""
    assert float(common.confidence(50 * math.log(3), 50.0)) == pytest.approx(0.75)
    margins = [10.0, -60.0, 55.0, 100.0]  # sigmoid(|m| / 50): 0.550, 0.769, 0.750, 0.881
    assert common.confident_subset(margins, 0.75, scale=50.0) == [1, 2, 3]
    assert common.confident_subset(margins, 0.75) == [0, 1, 2, 3]  # scale 1 keeps everything above |m| 1.1


def labelled_split(tmp_path, margins, correct, **options):
    """What common.student_data reads, as main() hands it over: the labelling options, the labelled (w2s) and
    helpfulness splits, and a labeller stage whose labels.jsonl has the given margins and "correct" fields (so a
    test can scramble the latter), read back with runs.read_labels."""
    exp = SimpleNamespace()
    exp.options = {"conf_threshold": 0.0, "conf_scale": 1.0, "drop_weak_errors": False, **options}
    exp.splits = {"w2s": [{"chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(len(margins))],
                  "extra": [{"chosen": "helpful", "rejected": "unhelpful"}]}
    folder = tmp_path / "labeller"
    rows = common.label_rows(margins)
    for row, c in zip(rows, correct):
        row["correct"] = c
    runs.write_jsonl(folder / "labels.jsonl", rows)
    return exp, {"dir": str(folder)}


def student_data(exp, setting, labeller):
    """The data of the student of `setting` (none, implicit, explicit) or, with "none", the intermediate model."""
    return common.student_data(runs.read_labels(labeller), exp.splits["w2s"], **exp.options,
                               helpful_pairs=exp.splits["extra"] if setting == "implicit" else ())


@pytest.mark.parametrize("labels", [{}, {"hard_labels": False}], ids=["dpo_simpo", "rm_soft"])
def test_student_data_never_reads_ground_truth_without_drop_weak_errors(tmp_path, labels):
    """Students never read ground truth through their data: the students' pairs and targets depend on the labeller's margins only; labels.jsonl's "correct"
    field (ground truth) is read only under --drop_weak_errors."""
    rng = random.Random(0)
    margins = [rng.uniform(-3, 3) for _ in range(40)] + [0.0]
    truth = [m > 0 for m in margins]
    scrambled = [rng.random() < 0.5 for _ in margins]
    assert scrambled != truth
    for threshold in (0.0, 0.6, 0.9):
        for setting in ("none", "implicit", "explicit"):
            exp, labeller = labelled_split(tmp_path / "a", margins, truth, conf_threshold=threshold, **labels)
            exp2, labeller2 = labelled_split(tmp_path / "b", margins, scrambled, conf_threshold=threshold, **labels)
            pairs, targets = student_data(exp, setting, labeller)
            assert (pairs, targets) == student_data(exp2, setting, labeller2)
            keep = [i for i, m in enumerate(margins) if 1 / (1 + math.exp(-abs(m))) >= threshold]
            assert 0 < len(keep) <= len(margins) and (threshold == 0) == (len(keep) == len(margins))
            n_extra = 1 if setting == "implicit" else 0
            assert pairs == [exp.splits["w2s"][i] for i in keep] + exp.splits["extra"][:n_extra]
            if labels.get("hard_labels", True):  # DPO and SimPO Args have no hard_labels: always hard
                assert targets == [float(margins[i] > 0) for i in keep] + [1.0] * n_extra
            else:
                assert targets == pytest.approx([1 / (1 + math.exp(-margins[i])) for i in keep] + [1.0] * n_extra)
    # with the option, "correct" is read, and the scrambled field changes the data
    exp, labeller = labelled_split(tmp_path / "c", margins, scrambled, conf_threshold=0.6, drop_weak_errors=True,
                                    **labels)
    pairs, _ = student_data(exp, "none", labeller)
    keep = [i for i, m in enumerate(margins) if 1 / (1 + math.exp(-abs(m))) >= 0.6 and scrambled[i]]
    assert pairs == [exp.splits["w2s"][i] for i in keep]


def test_implicit_student_gets_as_many_helpful_pairs_as_weak_pairs(tmp_path):
    """The paper's code: after the confidence filter, the helpfulness pairs are cut to the kept weak pairs."""
    margins = [3.0, 0.1, -2.5, 0.05, -0.2, 4.0]  # confidence >= 0.9 keeps 3 of them
    exp, labeller = labelled_split(tmp_path, margins, [m > 0 for m in margins], conf_threshold=0.9)
    exp.splits["extra"] = [{"chosen": f"helpful {i}", "rejected": f"unhelpful {i}"} for i in range(10)]
    pairs, targets = student_data(exp, "implicit", labeller)
    assert pairs == [exp.splits["w2s"][i] for i in (0, 2, 5)] + exp.splits["extra"][:3]
    assert targets == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    exp.options["conf_threshold"] = 0.0  # no filter: all 6 weak pairs, 6 of the 10 helpful ones
    pairs, _ = student_data(exp, "implicit", labeller)
    assert len(pairs) == 12 and pairs[6:] == exp.splits["extra"][:6]


def test_orient(tmp_path):
    pairs = [(f"a{i}", f"b{i}") for i in range(5)]  # (chosen, rejected) in ground-truth orientation
    original = copy.deepcopy(pairs)
    oriented, agree = common.orient(pairs, [1.0, 0.0, 0.8, 0.2, 0.5])
    # target > 0.5: the labeller prefers chosen; 0.5 (no preference) is not a preference for chosen
    assert oriented == [("a0", "b0"), ("b1", "a1"), ("a2", "b2"), ("b3", "a3"), ("b4", "a4")]
    assert agree == [True, False, True, False, False]
    assert pairs == original  # the ground-truth-oriented pairs are left as they were
    # through the students' data: chosen is the response the labeller's margin prefers
    exp, labeller = labelled_split(tmp_path, [2.0, -1.0, 0.5, -0.1], [True, False, True, False])
    pairs, targets = student_data(exp, "none", labeller)
    oriented, agree = common.orient([(p["chosen"], p["rejected"]) for p in pairs], targets)
    assert oriented == [("good 0", "bad 0"), ("bad 1", "good 1"), ("good 2", "bad 2"), ("bad 3", "good 3")]
    assert agree == [True, False, True, False]


# ---- the length baseline

def predicted_stages(tmp_path, correct_by_stage):
    """Finished stages as build_results reads them: each one's predictions.jsonl (margin +1 where the stage is
    right, -1 where wrong) and its summary."""
    stages = {}
    for name, correct in correct_by_stage.items():
        d = tmp_path / name
        runs.write_jsonl(d / "predictions.jsonl", [{"margin": 1.0 if c else -1.0, "correct": c} for c in correct])
        stages[name] = {"dir": str(d), "accuracy": sum(correct) / len(correct), "ties": 0, "n": len(correct)}
    return stages


def test_length_baseline_and_its_flag(tmp_path):
    """"Prefer the shorter response" on a hand-made split; a model that follows it is flagged."""
    p = "\n\nHuman: q\n\nAssistant:"
    test = [{"chosen": p + " no", "rejected": p + " sure thing"}, {"chosen": p + " a long good answer", "rejected": p + " ok"},
            {"chosen": p + " fine", "rejected": p + " okay, here it is"}, {"chosen": p + " same", "rejected": p + " size"}]
    assert common.length_rule(test) == [True, False, True, None]  # equal lengths: no preference
    stages = predicted_stages(tmp_path, {"weak": [True, False, True, False], "strong": [True, True, True, False],
                                         "student-none": [True, False, False, False]})
    results = runs.build_results(stages, rm_w2s.Args(), {"dropped": {}}, test)
    assert results["length_baseline"]["accuracy"] == 0.5  # the equal-length pair counts as wrong, like a tie
    assert results["length_baseline"]["equal_length"] == 1
    # agreement on the 3 pairs where the rule chose: strong and student-none are wrong on the equal-length pair,
    # which must not count as agreeing with a rule that made no choice there (it did before: 0.75 each)
    assert results["length_baseline"]["agreement"] == {"weak": 1.0, "strong": 2 / 3, "student-none": 2 / 3}
    flagged = [n for n in results["notes"] if "shorter response" in n]
    assert len(flagged) == 1 and flagged[0].startswith("weak agrees") and "100.0%" in flagged[0]


def test_length_baseline_when_no_response_is_shorter(tmp_path):
    """Equal-length responses everywhere (the toy task's REFUSE / COMPLY, the arithmetic testbed's near misses): the
    rule decides no pair, so its accuracy is null (not 0, which would read as a baseline that is always wrong), as is
    agreement, a model that is always wrong is not flagged as following length, and the report says why."""
    p = "\n\nHuman: q\n\nAssistant:"
    test = [{"chosen": p + " REFUSE", "rejected": p + " COMPLY"}, {"chosen": p + " COMPLY", "rejected": p + " REFUSE"}]
    assert common.length_rule(test) == [None, None]
    stages = predicted_stages(tmp_path, {"weak": [False, False], "strong": [False, False]})  # both always wrong
    results = runs.build_results(stages, rm_w2s.Args(), {"dropped": {}}, test)
    assert results["length_baseline"] == {"accuracy": None, "equal_length": 2,
                                          "agreement": {"weak": None, "strong": None}}
    assert not [n for n in results["notes"] if "shorter response" in n]
    assert "every test pair (2) are equally long" in runs.render_report(results, "RM")


# ----------------------------------------------------------------------------------------------------
# measures of a conflict against the no-conflict student, with intervals

def test_wilson_interval_hand_values():
    """Wilson score intervals at z = 1.96: 5/10 -> [0.2366, 0.7634], 0/10 -> [0, 0.2775] (hand-computed from
    (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)); empty -> None; always inside [0, 1]."""
    assert common.wilson(5, 10) == pytest.approx([0.236593, 0.763407], abs=1e-6)
    assert common.wilson(0, 10) == pytest.approx([0.0, 0.277533], abs=1e-6)
    assert common.wilson(10, 10) == pytest.approx([0.722467, 1.0], abs=1e-6)
    assert common.wilson(0, 0) is None
    for k in range(0, 31):
        lo, hi = common.wilson(k, 30)
        assert 0 <= lo <= k / 30 <= hi <= 1


def test_mcnemar_exact_against_brute_force():
    """The exact McNemar p-value equals the two-sided binomial test over every outcome at least as extreme,
    enumerated here (b + c discordant pairs, each a fair coin under the null)."""
    for n in range(0, 13):
        for b in range(n + 1):
            c = n - b
            probs = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
            # outcomes at least as far from n/2 as the observed b
            brute = sum(p for i, p in enumerate(probs) if abs(i - n / 2) >= abs(b - n / 2) - 1e-12) if n else 1.0
            assert common.mcnemar_exact(b, c) == pytest.approx(min(1.0, brute)), (b, c)
    assert common.mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert common.mcnemar_exact(9, 1) == common.mcnemar_exact(1, 9)


# Hand-made test set of 12 pairs. Areas from (weak, strong): WK&SK = 0-3, WK&SU = 4-5, WU&SK = 6-9, WU&SU = 10-11.
HAND_WEAK = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
HAND_STRONG = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0]
HAND_NONE = [1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 0, 1]      # right on 0,1,2 | 4 | 6,7 | 11
HAND_CONFLICT = [1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0]  # taxes 2 (WK&SK), 6, 7 (WU&SK), 11 (WU&SU); fixes 3, 5, 9


def test_conflict_tax_hand_example():
    tax = common.conflict_tax(HAND_WEAK, HAND_STRONG, HAND_NONE, HAND_CONFLICT)
    a = tax["areas"]
    expect = {  # area: (base right, taxed, base wrong, fixed)
        "weak-known & strong-known": (3, 1, 1, 1), "weak-known & strong-unknown": (1, 0, 1, 1),
        "weak-unknown & strong-known": (2, 2, 2, 1), "weak-unknown & strong-unknown": (1, 1, 1, 0)}
    for area, (right, taxed, wrong, fixed) in expect.items():
        assert (a[area]["base_right"], a[area]["taxed"], a[area]["base_wrong"], a[area]["fixed"]) == \
            (right, taxed, wrong, fixed), area
        assert a[area]["tax"] == pytest.approx(taxed / right) and a[area]["fix"] == pytest.approx(fixed / wrong)
        assert a[area]["tax_ci"] == pytest.approx(common.wilson(taxed, right))
    # where the tax lands: 3 strong-known pairs turned wrong, 2 of them weak-unknown; the base student gets 2 of
    # its 5 right strong-known pairs in weak-unknown
    assert tax["sk_taxed"] == 3 and tax["share_wu"] == pytest.approx(2 / 3)
    assert tax["base_rate_wu"] == pytest.approx(2 / 5)
    assert tax["share_wu_ci"] == pytest.approx(common.wilson(2, 3))
    # the paired test of ΔDS uses exactly the WU&SK pairs that changed: 2 taxed against 1 fixed
    assert tax["delta_ds_p"] == pytest.approx(common.mcnemar_exact(2, 1))
    ds = {name: common.knowledge_space(HAND_WEAK, HAND_STRONG, c)["ds"] for name, c in
          (("none", HAND_NONE), ("conflict", HAND_CONFLICT))}
    assert ds["conflict"] - ds["none"] == pytest.approx((2 - 1) / 4)  # ΔDS = (taxed - fixed) / |WU & SK|


def test_conflict_tax_without_change_is_zero_and_empty_areas_are_none():
    tax = common.conflict_tax(HAND_WEAK, HAND_STRONG, HAND_NONE, HAND_NONE)
    assert all(v["taxed"] == 0 and v["fixed"] == 0 for v in tax["areas"].values())
    assert tax["share_wu"] is None and tax["share_wu_ci"] is None and tax["delta_ds_p"] == 1.0
    everything_known = common.conflict_tax([1] * 4, [1] * 4, [1, 1, 0, 0], [0, 1, 1, 0])
    assert everything_known["areas"]["weak-unknown & strong-unknown"]["tax"] is None
    assert everything_known["base_rate_wu"] == 0.0 and everything_known["share_wu"] == 0.0
    with pytest.raises(ValueError):
        common.conflict_tax([1], [1, 0], [1], [1])


def test_disagreement_share_is_the_reviewers_restatement():
    """Of the pairs where the student and the strong ceiling disagree, the share in WU & SK: the conflict student
    disagrees with the strong ceiling on 2, 6, 7, 8 (SK, student wrong) and 4, 5 (SU, student right); 3 of those
    6 are in WU & SK."""
    share = common.disagreement_share(HAND_WEAK, HAND_STRONG, HAND_CONFLICT)
    assert (share["n_disagree"], share["in_wu_sk"]) == (6, 3)
    assert share["share"] == pytest.approx(3 / 6) and share["ci"] == pytest.approx(common.wilson(3, 6))
    assert common.disagreement_share([1, 0], [1, 1], [1, 1])["share"] is None


def test_knowledge_space_counts_errors_with_intervals():
    ks = common.knowledge_space(HAND_WEAK, HAND_STRONG, HAND_CONFLICT)
    wu = ks["areas"]["weak-unknown & strong-known"]
    assert (wu["n"], wu["errors"]) == (4, 3) and wu["ci"] == pytest.approx(common.wilson(3, 4))
    assert ks["ds"] == pytest.approx(3 / 4)


DOSE_CONFIG = {"weak": "w", "strong": "s1", "seed": 0, "lr": 0.1, "alpha": 0.5, "student_seed": -1, "settings": "none"}


def write_dose_run(root, name, config, stages):
    """A run folder as dose.py reads it: config.json (DOSE_CONFIG with `config`'s options) and, per finished stage,
    predictions.jsonl (margin +1 where `correct`, else -1) and a stage.json."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**DOSE_CONFIG, **config}))
    for stage, correct in stages.items():
        (folder / stage).mkdir()
        (folder / stage / "predictions.jsonl").write_text(
            "".join(json.dumps({"index": i, "margin": 1.0 if c else -1.0, "correct": c}) + "\n" for i, c in enumerate(correct)))
        (folder / stage / "stage.json").write_text("{}")
    return folder


def test_dose_response_reads_students_against_the_base_and_the_churn(tmp_path, capsys):
    """dose.py: each student against the base run's no-conflict student, per area: gross loss, fixes and the net
    change of the error rate, here on 6 pairs of weak-unknown & strong-known worked by hand."""
    from tools import dose
    weak, strong = [False] * 6 + [True] * 2, [True] * 8  # 6 pairs in WU ∩ SK, 2 in WK ∩ SK
    none = [True, True, True, True, False, False, True, True]
    write_dose_run(tmp_path, "a-base", {"settings": "none,explicit"}, {
        "weak": weak, "strong": strong, "student-none": none,
        "student-explicit": [False, False, False, True, True, False, True, True]})
    write_dose_run(tmp_path, "b-churn", {"student_seed": 1}, {"student-none": [True, True, True, False, False, False, True, True]})
    result = dose.document(tmp_path)[1]
    wu = common.WU_SK
    explicit = result["students"]["alpha 0.5"]["areas"][wu]
    assert (explicit["taxed"], explicit["base_right"], explicit["fixed"], explicit["base_wrong"]) == (3, 4, 1, 2)
    assert explicit["net"] == pytest.approx((3 - 1) / 6)
    se = math.sqrt(3 + 1 - (3 - 1) ** 2 / 6) / 6
    assert explicit["net_ci"] == pytest.approx([2 / 6 - 1.96 * se, 2 / 6 + 1.96 * se])
    assert explicit["p"] == pytest.approx(common.mcnemar_exact(3, 1))
    churn = result["students"]["churn (student_seed 1)"]["areas"][wu]
    assert (churn["taxed"], churn["fixed"], churn["net"]) == (1, 0, pytest.approx(1 / 6))
    assert result["students"]["alpha 0.5"]["areas"][common.WK_SK]["net"] == 0
    assert list(result["students"])[0].startswith("churn")  # the churn first: the reference every alpha is read against
    dose.main([str(tmp_path)])
    text = (tmp_path / "dose.md").read_text()
    assert "| alpha 0.5 | 6 | 3/4 = 0.750 [" in text and (tmp_path / "dose.png").stat().st_size > 0
    (tmp_path / "b-churn" / "config.json").write_text('{"alpha": 0.5, "stud')  # cut short: left out, with a line
    body, result, _, left_out = dose.document(tmp_path)
    assert list(result["students"]) == ["alpha 0.5"]
    assert [(f.name, why) for f, why in left_out] == [("b-churn", "its config.json does not read as a run's options")]
    assert "- `b-churn`: its config.json does not read as a run's options" in body
    dose.main([str(tmp_path)])
    assert "dose.py: left out" in capsys.readouterr().err


def test_dose_matches_pairs_on_the_strong_ceilings_margin():
    """dose.margin_strata on 6 strong-known pairs in 2 bins of the strong ceiling's margin, worked by hand: bin 1
    (margins 1-3) WU {0, 2} net 1/2, WK {1} net 0; bin 2 (margins 4-6) WU {3} net 1, WK {4, 5} net 1/2; the
    difference weighted by WU pairs (2 * 1/2 + 1 * 1/2) / 3 = 1/2, its variance (4 * 1/8 + 1 * 1/8) / 9."""
    from tools import dose
    weak = [False, True, False, False, True, True]
    strong, margin, none = [True] * 6, [3.0, 2.0, 1.0, 6.0, 5.0, 4.0], [True] * 6
    student = [False, True, True, False, False, True]
    st = dose.margin_strata(weak, strong, margin, none, {"alpha 0.5": student}, bins=2)["alpha 0.5"]
    b1, b2 = st["bins"]
    assert b1["margin"] == [1.0, 3.0] and b2["margin"] == [4.0, 6.0]
    assert (b1["wu"]["n"], b1["wu"]["net"], b1["wk"]["n"], b1["wk"]["net"]) == (2, 0.5, 1, 0.0)
    assert (b2["wu"]["n"], b2["wu"]["net"], b2["wk"]["n"], b2["wk"]["net"]) == (1, 1.0, 2, 0.5)
    assert st["difference"] == pytest.approx(0.5)
    half = 1.96 * math.sqrt(4 * 0.125 + 1 * 0.125) / 3
    assert st["difference_ci"] == pytest.approx([0.5 - half, 0.5 + half])
    assert dose.margin_strata([True], [False], [0.0], [True], {"a": [True]}, bins=1)["a"]["difference"] is None


def test_dose_reads_an_arithmetic_pair_per_tier(tmp_path):
    """dose.py on --data arith runs: per tier, the ceilings' accuracy and each student's net change in
    weak-unknown & strong-known against the base student, counted here pair by pair from the tiers arith.py gives
    the test split."""
    import arith
    from tools import dose
    config = {"data": "arith", "n_gt": 5, "n_w2s": 5, "n_test": 20, "seed": 3}
    tiers = arith.tiers_of_test_split(config)
    weak = [i % 3 == 0 for i in range(20)]
    strong = [i % 5 != 1 for i in range(20)]
    none = [i % 2 == 0 for i in range(20)]
    explicit = [i % 4 == 0 for i in range(20)]
    write_dose_run(tmp_path, "a-base", {**config, "settings": "none,explicit"}, {
        "weak": weak, "strong": strong, "student-none": none, "student-explicit": explicit})
    result = dose.document(tmp_path)[1]
    assert list(result["tiers"]) == list(dict.fromkeys(tiers)) and set(tiers) == set(arith.TIERS)
    for tier, row in result["tiers"].items():
        idx = [i for i in range(20) if tiers[i] == tier]
        assert row["pairs"] == len(idx) == 4
        assert row["weak"] == pytest.approx(sum(weak[i] for i in idx) / 4)
        for area, known in ((common.WU_SK, False), (common.WK_SK, True)):
            pairs = [i for i in idx if weak[i] == known and strong[i]]
            taxed = sum(none[i] and not explicit[i] for i in pairs)
            fixed = sum(explicit[i] and not none[i] for i in pairs)
            a = row["students"]["alpha 0.5"][area]
            assert (a["n"], a["taxed"], a["fixed"]) == (len(pairs), taxed, fixed)
            assert a["net"] == (pytest.approx((taxed - fixed) / len(pairs)) if pairs else None)
    dose.main([str(tmp_path)])
    text = (tmp_path / "dose.md").read_text()
    assert "| student | tier | WU ∩ SK: n | net change | McNemar p | WK ∩ SK: n |" in text and "| alpha 0.5 | add2 |" in text
    write_dose_run(tmp_path / "hh", "a-base", {"settings": "none,explicit"}, {  # other data: no per-tier part
        "weak": weak, "strong": strong, "student-none": none, "student-explicit": explicit})
    assert "tiers" not in dose.document(tmp_path / "hh")[1]


def test_dose_reads_a_folder_of_several_pairs_pair_by_pair(tmp_path):
    """dose.py on a folder of several weak/strong pairs (a ladder, seeds): each pair's runs are read together (they
    differ only in alpha and --student_seed), one section and one figure per pair, headed by what tells the pairs
    apart; a pair without a finished no-conflict student is named, not read."""
    from tools import dose
    weak, strong = [False, False, True, True], [True] * 4
    write_dose_run(tmp_path, "rm-a", {"strong": "s1"}, {"weak": weak, "strong": strong,
                   "student-none": [True, False, True, True], "student-explicit": [False, False, True, True]})
    write_dose_run(tmp_path, "rm-b", {"strong": "s1", "alpha": 0.2, "settings": "explicit"},
                   {"student-explicit": [True, True, True, True]})
    write_dose_run(tmp_path, "rm-c", {"strong": "s2"}, {"weak": weak, "strong": strong,
                   "student-none": [True, True, True, True], "student-explicit": [True, True, False, True]})
    write_dose_run(tmp_path, "rm-d", {"strong": "s3"}, {"weak": weak})  # unfinished
    body, results, figures, left_out = dose.document(tmp_path)
    assert list(results) == ["rm: w -> s1", "rm: w -> s2"]  # the method: the folder name's first word (no results.json)
    assert list(results["rm: w -> s1"]["students"]) == ["alpha 0.2", "alpha 0.5"]
    s1 = results["rm: w -> s1"]["students"]["alpha 0.5"]["areas"][common.WU_SK]
    assert (s1["taxed"], s1["fixed"], s1["n"]) == (1, 0, 2)  # against a's none student, not c's
    s2 = results["rm: w -> s2"]["students"]["alpha 0.5"]["areas"][common.WK_SK]
    assert (s2["taxed"], s2["base_right"]) == (1, 2)
    assert list(figures) == ["dose-1.png", "dose-2.png"]
    assert body.count("## rm: w -> ") == 2
    assert [(f.name, why) for f, why in left_out] == [
        ("rm-d", "its pair (rm: w -> s3) has no run with finished ceilings and a finished no-conflict student")]
    dose.main([str(tmp_path)])
    assert (tmp_path / "dose-2.png").stat().st_size > 0 and not (tmp_path / "dose.png").exists()
