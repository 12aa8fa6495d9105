"""tools/power.py: McNemar's power against brute force, the t-test's against simulation, OLS against a hand
computation, the planner against its own power function, and the folder mode on run folders written here."""
import json
import math
import random
import statistics

import pytest

import common
from tools import power


def brute_force_power(n, psi, delta, alpha):
    """Every outcome (b, c, concordant) of n pairs with its multinomial probability; reject as common.mcnemar_exact."""
    p_b, p_c, p_0 = (psi + delta) / 2, (psi - delta) / 2, 1 - psi
    total = 0.0
    for b in range(n + 1):
        for c in range(n - b + 1):
            if common.mcnemar_exact(b, c) <= alpha:
                total += (math.factorial(n) / (math.factorial(b) * math.factorial(c) * math.factorial(n - b - c))
                          * p_b ** b * p_c ** c * p_0 ** (n - b - c))
    return total


def test_critical_values_are_mcnemars_rejection_region():
    for d in range(0, 80):
        k = power.mcnemar_critical(d)
        assert all((common.mcnemar_exact(i, d - i) <= 0.05) == (i <= k) for i in range(d // 2 + 1))


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_mcnemar_power_is_the_brute_force_enumeration(alpha):
    for n in range(0, 15):
        for psi, delta in [(0.3, 0.0), (0.3, 0.1), (0.3, -0.1), (0.6, 0.3), (0.6, 0.6), (1.0, 0.5)]:
            assert power.mcnemar_power(n, psi, delta, alpha) == pytest.approx(
                brute_force_power(n, psi, delta, alpha), abs=1e-12), (n, psi, delta)


def test_mcnemar_power_known_values():
    # at ΔDS = 0 it is the exact test's size: at most alpha, near it for many pairs
    assert 0.03 < power.mcnemar_power(2000, 0.2, 0.0) <= 0.05
    assert power.mcnemar_power(50, 0.2, 0.0) <= 0.05
    # it rises with the pairs and with the effect, and falls with the discordant share
    by_n = [power.mcnemar_power(n, 0.2, 0.05) for n in (100, 200, 400, 800, 1600)]
    assert by_n == sorted(by_n) and by_n[-1] > 0.99
    by_delta = [power.mcnemar_power(400, 0.2, d) for d in (0.0, 0.02, 0.05, 0.1, 0.2)]
    assert by_delta == sorted(by_delta) and by_delta[-1] == pytest.approx(1.0)
    assert power.mcnemar_power(400, 0.1, 0.05) > power.mcnemar_power(400, 0.3, 0.05)
    assert power.mcnemar_power(0, 0.2, 0.05) == power.mcnemar_power(100, 0.0, 0.0) == 0.0
    with pytest.raises(ValueError):
        power.mcnemar_power(100, 0.04, 0.05)  # a ΔDS larger than the discordant share cannot happen


def test_smallest_detectable_delta():
    d = power.mcnemar_min_delta(450, 0.15)
    assert power.mcnemar_power(450, 0.15, d) >= 0.8 > power.mcnemar_power(450, 0.15, d - 1e-4)
    assert power.mcnemar_min_delta(5, 0.2) is None  # 5 pairs never reach 80%


@pytest.mark.parametrize("psi,delta", [(0.2, 0.05), (0.15, 0.05), (0.3, 0.1), (0.1, 0.08)])
def test_planned_pairs_reach_the_power_and_one_fewer_does_not(psi, delta):
    n = power.mcnemar_pairs_needed(psi, delta)
    assert power.mcnemar_power(n, psi, delta) >= 0.8 > power.mcnemar_power(n - 1, psi, delta)
    assert abs(n - power.mcnemar_pairs_normal(psi, delta)) < 0.15 * n  # the normal approximation is close


def test_t_quantiles():
    for nu, t in [(1, 12.706205), (2, 4.302653), (4, 2.776445), (10, 2.228139), (30, 2.042272)]:
        assert power.t_quantile(0.975, nu) == pytest.approx(t, abs=2e-5)
    assert power.norm_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)


@pytest.mark.parametrize("delta,sd,k", [(0.05, 0.033, 3), (0.05, 0.05, 5), (0.0, 0.03, 4)])
def test_t_test_power_against_simulation(delta, sd, k):
    rng, reps = random.Random(0), 20000
    c = power.t_quantile(0.975, k - 1)
    hits = 0
    for _ in range(reps):
        x = [rng.gauss(delta, sd) for _ in range(k)]
        hits += abs(statistics.fmean(x) / (statistics.stdev(x) / math.sqrt(k))) > c
    p = power.t_test_power(delta, sd, k)
    assert abs(hits / reps - p) < 4 * math.sqrt(p * (1 - p) / reps)
    if delta == 0:
        assert p == pytest.approx(0.05, abs=1e-6)


def test_seeds_needed_is_the_first_that_reaches_the_power():
    for sd in (0.02, 0.033, 0.05):
        k = power.seeds_needed(0.05, sd)
        assert power.t_test_power(0.05, sd, k) >= 0.8
        assert k == 2 or power.t_test_power(0.05, sd, k - 1) < 0.8
    assert power.t_test_power(0.05, 0.03, 3) < power.t_test_power(0.05, 0.03, 5) < power.t_test_power(0.05, 0.03, 9)


def test_ols_against_a_hand_computed_example():
    # x = 0..3, y = 1, 3, 2, 5: Sxx = 5, Sxy = 5.5, slope 1.1, intercept 1.1, SSE = 0.01 + 0.64 + 1.69 + 0.36 = 2.7,
    # se = sqrt(2.7 / 2 / 5) = sqrt(0.27), t(0.975, 2) = 4.302653
    fit = power.ols([0, 1, 2, 3], [1, 3, 2, 5])
    assert fit["slope"] == pytest.approx(1.1) and fit["intercept"] == pytest.approx(1.1)
    assert fit["se"] == pytest.approx(math.sqrt(0.27))
    half = 4.302653 * math.sqrt(0.27)
    assert fit["ci"] == pytest.approx([1.1 - half, 1.1 + half], abs=1e-5)
    assert fit["change_ci"] == pytest.approx([3 * (1.1 - half), 3 * (1.1 + half)], abs=1e-4)
    # the fitted line at x = 0: 1.1 +- t sqrt(s2 (1/4 + 1.5^2 / 5)) = 1.1 +- t sqrt(1.35 * 0.7)
    assert fit["band"][0]["ci"] == pytest.approx([1.1 - 4.302653 * math.sqrt(0.945), 1.1 + 4.302653 * math.sqrt(0.945)],
                                                 abs=1e-5)
    assert power.ols([1, 1, 1], [1, 2, 3]) is None and power.ols([1, 2], [1, 2]) is None


def test_plan_mode(capsys):
    p = power.plan(0.6, 0.9, discordant=0.2, delta=0.05, sd=0.03)
    assert p["share_wu_sk"] == pytest.approx(0.4 * 0.9)  # independence: (1 - a_w) a_s
    assert p["pairs"] == power.mcnemar_pairs_needed(0.2, 0.05)
    assert p["test_pairs"] == math.ceil(p["pairs"] / 0.36)
    assert p["seeds"] == power.seeds_needed(0.05, 0.03)
    assert power.plan(0.6, 0.9, overlap=0.5)["share_wu_sk"] == pytest.approx(0.2)  # a measured overlap
    power.main(["--plan", "--weak_acc", "0.6", "--strong_acc", "0.9"])
    out = capsys.readouterr().out
    assert f"| test pairs needed | {p['test_pairs']} |" in out and "independently" in out


# ----------------------------------------------------------------------------------------------------
# the folder mode on run folders written as the scripts write them

N, WEAK_KNOWN = 100, 60  # the weak ceiling gets the first 60 test pairs right
STRONG_KNOWN = {"m:first4": 80, "m:first16": 90}  # the strong ceilings the first 80 / 90: WU ∩ SK is 60..79 / 60..89


def students(strong, h, b, c):
    """none right on WK and the first h pairs of WU ∩ SK; explicit its copy with b of those turned wrong and c of
    none's wrong WU ∩ SK pairs turned right: ΔDS = (b - c) / n."""
    wu_sk = list(range(WEAK_KNOWN, STRONG_KNOWN[strong]))
    none = [i < WEAK_KNOWN or i in wu_sk[:h] for i in range(N)]
    explicit = list(none)
    for i in wu_sk[:b] + wu_sk[h:h + c]:
        explicit[i] = not explicit[i]
    return none, explicit


def write_run(root, name, strong, seed, none=None, explicit=None, alpha=0.5, intermediate="", student_seed=-1):
    folder = root / name
    config = {"data": "hh", "weak": "m:first2", "strong": strong, "intermediate": intermediate, "lr": 3e-4,
              "settings": "none,explicit", "alpha": alpha, "seed": seed, "student_seed": student_seed}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    stages = {"weak": [i < WEAK_KNOWN for i in range(N)],
              "strong": [i < STRONG_KNOWN[strong] for i in range(N)], "student-none": none,
              "student-explicit": explicit}
    for stage, correct in stages.items():
        if correct is None:
            continue
        (folder / stage).mkdir()
        (folder / stage / "predictions.jsonl").write_text(
            "".join(json.dumps({"index": i, "margin": 1.0 if x else -1.0, "correct": x}) + "\n"
                    for i, x in enumerate(correct)))


LADDER = {"m:first4": [(10, 2, 1), (10, 1, 2), (10, 3, 1)], "m:first16": [(15, 4, 1), (15, 3, 1), (15, 5, 2)]}


@pytest.fixture
def ladder(tmp_path):
    root = tmp_path / "ladder"
    for strong, seeds in LADDER.items():
        for seed, (h, b, c) in enumerate(seeds):
            none, explicit = students(strong, h, b, c)
            if strong == "m:first16" and seed == 0:
                explicit[0] = False  # one more error where the supervisor can check
            write_run(root, f"rm-{strong[2:]}-s{seed}", strong, seed, none, explicit)
    for seed, extra in enumerate([2, 2, 0]):  # bootstrapping: none right on `extra` more pairs, explicit (1, 1) from it
        none, explicit = students("m:first16", 15 + extra, 1, 1)
        write_run(root, f"rm-first16-via-first8-s{seed}", "m:first16", seed, none, explicit, intermediate="m:first8")
    write_run(root, "rm-first16-s0-churn", "m:first16", 0, *students("m:first16", 15, 0, 0)[:1], student_seed=1)
    write_run(root, "rm-first8-s0-unfinished", "m:first4", 0)
    return root


def test_folder_mode_on_synthetic_runs(ladder, tmp_path, capsys):
    out = tmp_path / "out"
    power.main([str(ladder), "--out", str(out)])
    printed = capsys.readouterr().out
    assert str(out / "power.md") in printed and not (ladder / "power.md").exists()
    assert (out / "power.md").read_text().splitlines()[0] == f"`python tools/power.py {ladder} --out {out}`"
    result = json.loads((out / "power.json").read_text())

    runs = {r["dir"]: r for r in result["runs"]}
    assert len(runs) == 9
    assert {x["dir"] for x in result["left_out"]} == {"rm-first16-s0-churn", "rm-first8-s0-unfinished"}
    for strong, seeds in LADDER.items():
        n = STRONG_KNOWN[strong] - WEAK_KNOWN
        for seed, (h, b, c) in enumerate(seeds):
            r = runs[f"rm-{strong[2:]}-s{seed}"]
            assert (r["n"], r["b"], r["c"]) == (n, b, c)
            assert r["gap"] == pytest.approx((STRONG_KNOWN[strong] - WEAK_KNOWN) / N)
            assert r["delta_ds"] == pytest.approx((b - c) / n)
            assert r["ds_none"] == pytest.approx((n - h) / n)
            assert r["discordant"] == pytest.approx((b + c) / n)
            assert r["power"] == pytest.approx(power.mcnemar_power(n, (b + c) / n, 0.05))
            assert r["p"] == common.mcnemar_exact(b, c)
            assert r["share_wu_sk_independent"] == pytest.approx(0.4 * STRONG_KNOWN[strong] / N)
            assert r["overlap"] == pytest.approx((N - STRONG_KNOWN[strong]) / (N - WEAK_KNOWN))

    configs = {g["rung"]: g for g in result["configs"]}
    assert set(configs) == {"first2 -> first4", "first2 -> first16", "first2 -> first16 via first8"}
    means = {}
    for strong, seeds in LADDER.items():
        n = STRONG_KNOWN[strong] - WEAK_KNOWN
        values = [(b - c) / n for _, b, c in seeds]
        g = configs[f"first2 -> {strong[2:]}"]
        assert g["delta_ds"] == pytest.approx(values) and g["sd"] == pytest.approx(statistics.stdev(values))
        assert g["t_power"] == pytest.approx(power.t_test_power(0.05, statistics.stdev(values), 3))
        means[strong] = statistics.fmean(values)
    # two gaps among the direct runs: the slope is the difference of the means over the difference of the gaps
    assert result["slopes"]["direct runs"]["slope"] == pytest.approx((means["m:first16"] - means["m:first4"]) / 0.1)

    boot = result["bootstrapping"]
    assert len(boot["rows"]) == 3 and all(row["same_ceilings"] for row in boot["rows"])
    assert (boot["none"]["falls"], boot["explicit"]["falls"]) == (2, 3)

    wide = result["widest"]
    assert wide["rung"] == "first2 -> first16" and wide["all_positive"] and wide["positive"] == 3
    assert wide["err_wk_sk_rises"] == 1


def matched_by_hand(strong, none, explicit, bins=5):
    """tools/dose.py's difficulty-matched difference recounted: the synthetic strong margins are all equal, so the
    strong-known pairs fall into bins in index order; per bin the mean of (explicit wrong) - (none wrong) over its
    WU ∩ SK pairs minus that over its WK ∩ SK pairs, weighted by the WU ∩ SK pairs."""
    known = [i for i in range(N) if i < STRONG_KNOWN[strong]]
    num = den = 0
    for b in range(bins):
        idx = known[round(len(known) * b / bins):round(len(known) * (b + 1) / bins)]
        wu, wk = [i for i in idx if i >= WEAK_KNOWN], [i for i in idx if i < WEAK_KNOWN]
        if wu and wk:
            net = [sum((not explicit[i]) - (not none[i]) for i in area) / len(area) for area in (wu, wk)]
            num, den = num + len(wu) * (net[0] - net[1]), den + len(wu)
    return num / den


def test_folder_mode_reads_wk_sk_and_the_matched_difference_across_seeds(ladder, tmp_path):
    power.main([str(ladder), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "power.json").read_text())
    runs = {r["dir"]: r for r in result["runs"]}
    configs = {g["rung"]: g for g in result["configs"]}
    for strong, seeds in LADDER.items():
        matched, wk = [], []
        for seed, (h, b, c) in enumerate(seeds):
            none, explicit = students(strong, h, b, c)
            if strong == "m:first16" and seed == 0:
                explicit[0] = False
            r = runs[f"rm-{strong[2:]}-s{seed}"]
            wk.append(1 / WEAK_KNOWN if strong == "m:first16" and seed == 0 else 0.0)
            matched.append(matched_by_hand(strong, none, explicit))
            assert r["delta_err_wk_sk"] == pytest.approx(wk[-1]) and r["matched"] == pytest.approx(matched[-1])
        g = configs[f"first2 -> {strong[2:]}"]
        assert g["matched"]["values"] == pytest.approx(matched) and g["wk_sk"]["values"] == pytest.approx(wk)
        mean, sd = statistics.fmean(matched), statistics.stdev(matched)
        t = abs(mean) / (sd / math.sqrt(3))
        assert g["matched"]["mean"] == pytest.approx(mean) and g["matched"]["sd"] == pytest.approx(sd)
        assert g["matched"]["p"] == pytest.approx(2 * (1 - power.nct_cdf(t, 2)))
    assert configs["first2 -> first4"]["wk_sk"]["sd"] == 0 and configs["first2 -> first4"]["wk_sk"]["p"] is None
    text = (tmp_path / "power.md").read_text()
    g = configs["first2 -> first16"]
    assert (f"| first2 -> first16 | 0.5 | +0.017, +0.000, +0.000 | +0.006 ± 0.010 {power.interval(g['wk_sk']['ci'])} | "
            f"{g['wk_sk']['p']:.2g} | " + ", ".join(f"{v:+.3f}" for v in g["matched"]["values"])) in text


def test_folder_mode_reads_arithmetic_runs_per_tier(tmp_path):
    """On arithmetic runs power.py gives, per tier and across seeds, ΔDS inside the tier's WU ∩ SK pairs and the
    change of the error in its WK ∩ SK pairs, recounted here from the tiers arith.py gives each test pair; a run
    whose config.json names another test split than its predictions cover is left out, with the reason."""
    import arith
    root, rng, by_hand = tmp_path / "arith", random.Random(0), {}
    for seed in range(3):
        folder = root / f"simpo-arith-s{seed}"
        config = {"data": "arith", "weak": "m:first2", "strong": "m:first16", "intermediate": "", "alpha": 0.5,
                  "seed": seed, "student_seed": -1, "n_gt": 20, "n_w2s": 20, "n_test": N}
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
        stages = {s: [rng.random() < 0.7 for _ in range(N)] for s in power.STAGES}
        for stage, correct in stages.items():
            (folder / stage).mkdir()
            (folder / stage / "predictions.jsonl").write_text(
                "".join(json.dumps({"index": i, "margin": 1.0 if x else -1.0, "correct": x}) + "\n"
                        for i, x in enumerate(correct)))
        weak, strong, none, explicit = (stages[s] for s in power.STAGES)
        tiers = arith.tiers_of_test_split(config)
        for tier in set(tiers):
            for area, weak_known in (("wu", False), ("wk", True)):
                idx = [i for i in range(N) if tiers[i] == tier and weak[i] == weak_known and strong[i]]
                change = (sum(not explicit[i] for i in idx) - sum(not none[i] for i in idx)) / len(idx)
                by_hand.setdefault((tier, area), []).append(change)
    bad = root / "simpo-arith-s3"  # a test split of 50 pairs, predictions of 100
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "seed": 3, "n_test": 50}))
    for stage in power.STAGES:
        (bad / stage).mkdir()
        (bad / stage / "predictions.jsonl").write_text((folder / stage / "predictions.jsonl").read_text())

    power.main([str(root), "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "power.json").read_text())
    assert [x["dir"] for x in result["left_out"]] == ["simpo-arith-s3"]
    assert "test split of 50 pairs, the predictions cover 100" in result["left_out"][0]["reason"]
    (g,) = result["configs"]
    assert list(g["tiers"]) == [t for t in arith.TIERS if t in g["tiers"]] and len(g["tiers"]) == len(arith.TIERS)
    for tier, t in g["tiers"].items():
        assert t["delta_ds"]["values"] == pytest.approx(by_hand[(tier, "wu")])
        assert t["wk_sk"]["values"] == pytest.approx(by_hand[(tier, "wk")])
        assert t["delta_ds"]["mean"] == pytest.approx(statistics.fmean(by_hand[(tier, "wu")]))
        assert t["delta_ds"]["sd"] == pytest.approx(statistics.stdev(by_hand[(tier, "wu")]))
    text = (tmp_path / "out" / "power.md").read_text()
    tier = next(iter(g["tiers"]))
    assert f"| first2 -> first16 | 0.5 | {tier} | " in text and "Per tier (arithmetic runs)" in text
