"""Power: could these runs see a ΔDS of 0.05, and how large must the next ones be to see it?

ΔDS = DS(explicit student) - DS(no-conflict student) over the same test pairs in weak-unknown ∩ strong-known
(WU ∩ SK, n of them). Per pair the two students are concordant, or discordant: b pairs the no-conflict student
gets right and the explicit one wrong, c the other way, so ΔDS = (b - c) / n and McNemar's exact test reads b
against c (common.mcnemar_exact, two-sided, level alpha).

Per seed, McNemar (exact enumeration, no simulation). Each of the n pairs is discordant with probability psi (the
discordant share), b-type with p_b = (psi + delta) / 2 and c-type with p_c = (psi - delta) / 2, so that
E[ΔDS] = delta; pairs independent. With D = b + c ~ Binomial(n, psi) and b | D = d ~ Binomial(d, q),
q = p_b / psi = (1 + delta / psi) / 2:
    power(n, psi, delta) = sum_d P(D = d) [P(b <= k_d) + P(b >= d - k_d)]
where k_d is the largest k with mcnemar_exact(k, d - k) <= alpha (the test's rejection region, both sides). Terms of
a binomial more than 15 standard deviations + 10 from its mean are left out (below 1e-25 in all). At delta = 0
this is the test's true size (at most alpha: the exact test is conservative). The smallest detectable ΔDS is the
delta at which power reaches the target (80%) with psi held at the measured discordant share (bisection; power
rises with |delta|); the pairs needed are the smallest n with power(n) >= target whose n - 1 falls short
(bisection between a failing and a passing n; exact power is not quite monotone in n, so this is the first
crossing found, and the normal approximation n ~ (z_{1-alpha/2} sqrt(psi) + z_power sqrt(psi - delta^2))^2 / delta^2
(Connor 1987) is printed beside it).

Across seeds, a one-sample t-test of the per-seed ΔDS against 0 (two-sided, level alpha), k seeds, seed-to-seed
standard deviation sd: T = (Z + ncp) / S with ncp = delta sqrt(k) / sd, S = sqrt(chi2_nu / nu), nu = k - 1, so
    power = P(T > c) + P(T < -c) = E_S[1 - Phi(c S - ncp) + Phi(-c S - ncp)],   c = t_{1 - alpha/2, nu}
computed exactly up to quadrature (Simpson's rule over the density of S, 2000 intervals; the t quantile c is the
same integral with ncp = 0, inverted by bisection), not by a normal approximation. Seeds needed: the smallest k with
power >= target (power rises with k).

Across rungs, ordinary least squares of ΔDS on the capability gap (strong ceiling's test accuracy - weak
ceiling's), slope se = sqrt(SSE / (m - 2) / Sxx), 95% interval slope +- t_{0.975, m-2} se; "the change it allows"
over the measured gaps is that interval times (largest gap - smallest gap).

Planning from calibrated ceilings (--plan): with weak accuracy a_w and strong accuracy a_s, the share of test
pairs in WU ∩ SK is (1 - a_w)(1 - r), r = P(strong wrong | weak wrong); assuming the ceilings err independently
r = 1 - a_s, so the share is (1 - a_w) a_s. Errors of two models on one task are usually correlated (both miss the
hard pairs), which makes r larger and the share smaller: pass the r a ladder measured (--overlap; the folder mode
prints it per run). Test pairs needed = ceil(pairs needed in WU ∩ SK / share).

The folder mode reads every run folder under FOLDER holding weak, strong, student-none and student-explicit
predictions (churn runs and unfinished ones are named and left out), groups them by rung (weak, strong,
intermediate model) and alpha, and writes power.md (its first line the command) and power.json: the numbers above
per run and per rung; across seeds, beside ΔDS, the change of the error in WK ∩ SK (the area the supervisor can
check) and the difficulty-matched difference of tools/dose.py (WU ∩ SK minus WK ∩ SK within bins of the strong
ceiling's margin), each with its t interval and t-test, and on arithmetic runs ΔDS and the WK ∩ SK change inside
each tier (arith.py's tier of each test pair); the slope, raw DS of each bootstrapped run's students
against the direct run's of the same models, alpha and seed, and the widest direct rung's explicit students (ΔDS
beside the change of the error in WK ∩ SK).

  python tools/power.py results/ladder --out /tmp/ladder-power     # power.md, power.json in --out (default: FOLDER)
  python tools/power.py --plan --weak_acc 0.6 --strong_acc 0.9 [--discordant 0.2] [--delta 0.05] [--sd 0.03]
                        [--power 0.8] [--overlap R]
"""
import argparse
import functools
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and the method scripts: one folder up

import arith
import common
import runs
from tools import dose, sweep

ALPHA, DELTA, TARGET = 0.05, 0.05, 0.8
STAGES = ("weak", "strong", "student-none", "student-explicit")


# ----------------------------------------------------------------------------------------------------
# the normal and binomial distributions

def norm_cdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def norm_quantile(p):
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if norm_cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def binom_window(n, p):
    """The range of Binomial(n, p) outside which every term is negligible (15 sd + 10 from the mean)."""
    width = 15 * math.sqrt(n * p * (1 - p)) + 10
    return max(0, math.floor(n * p - width)), min(n, math.ceil(n * p + width))


def binom_pmfs(n, p, lo, hi):
    """(i, P(X = i)) for X ~ Binomial(n, p), i = lo..hi, in log space (no underflow far in a tail)."""
    if p <= 0 or p >= 1:
        i = 0 if p <= 0 else n
        return [(i, 1.0)] if lo <= i <= hi else []
    log_ratio = math.log(p / (1 - p))
    log_pmf = (math.lgamma(n + 1) - math.lgamma(lo + 1) - math.lgamma(n - lo + 1)
               + lo * math.log(p) + (n - lo) * math.log1p(-p))
    out = []
    for i in range(lo, hi + 1):
        out.append((i, math.exp(log_pmf)))
        if i < n:
            log_pmf += math.log((n - i) / (i + 1)) + log_ratio
    return out


def binom_cdf(k, n, p):
    """P(X <= k), X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    lo, hi = binom_window(n, p)
    if k >= hi:
        return 1.0
    return math.fsum(w for _, w in binom_pmfs(n, p, lo, k)) if k >= lo else 0.0


# ----------------------------------------------------------------------------------------------------
# McNemar's exact test: critical values, power, smallest detectable ΔDS, pairs needed

@functools.lru_cache(maxsize=None)
def mcnemar_critical(d, alpha=ALPHA):
    """The largest k whose p from common.mcnemar_exact(k, d - k) is <= alpha (-1: none), in the same integer
    arithmetic and the same float division, so the rejection region is exactly that test's."""
    total, term, k = 0, 1, -1  # term = comb(d, i)
    for i in range((d + 1) // 2):
        total += term
        if min(1.0, 2 * total / 2 ** d) > alpha:
            break
        k = i
        term = term * (d - i) // (i + 1)
    return k


def mcnemar_power(n, discordant, delta, alpha=ALPHA):
    """P(McNemar's exact two-sided test at `alpha` rejects) over n pairs, each discordant with probability
    `discordant`, the expected ΔDS being `delta` (module docstring). Exact enumeration over D = b + c."""
    psi, delta = discordant, abs(delta)
    if not 0 <= psi <= 1 or delta > psi + 1e-12:
        raise ValueError(f"a ΔDS of {delta} needs a discordant share of at least that much; got {psi}")
    if n == 0 or psi == 0:
        return 0.0
    q = min(1.0, (psi + delta) / (2 * psi))  # P(a discordant pair is the explicit student's error)
    power = 0.0
    for d, weight in binom_pmfs(n, psi, *binom_window(n, psi)):
        k = mcnemar_critical(d, alpha)
        if k >= 0:  # b <= k, or c = d - b <= k
            power += weight * (binom_cdf(k, d, q) + binom_cdf(k, d, 1 - q))
    return min(power, 1.0)


def mcnemar_min_delta(n, discordant, alpha=ALPHA, target=TARGET):
    """The smallest ΔDS McNemar detects with `target` power at n pairs and this discordant share (bisection to
    1e-5; the upper end, so the power there is >= target); None if even ΔDS = discordant share falls short."""
    if n == 0 or discordant == 0 or mcnemar_power(n, discordant, discordant, alpha) < target:
        return None
    lo, hi = 0.0, discordant
    while hi - lo > 1e-5:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mcnemar_power(n, discordant, mid, alpha) < target else (lo, mid)
    return hi


def mcnemar_pairs_normal(discordant, delta, alpha=ALPHA, target=TARGET):
    """Connor's (1987) normal approximation to the pairs McNemar needs (the module docstring's formula)."""
    za, zb = norm_quantile(1 - alpha / 2), norm_quantile(target)
    return math.ceil((za * math.sqrt(discordant) + zb * math.sqrt(discordant - delta ** 2)) ** 2 / delta ** 2)


def mcnemar_pairs_needed(discordant, delta, alpha=ALPHA, target=TARGET, most=10 ** 7):
    """The smallest n of pairs with mcnemar_power(n) >= target whose n - 1 falls short: bisection between an n
    that fails and one that passes, started from the normal approximation. None above `most` pairs."""
    if delta == 0 or abs(delta) > discordant:
        return None
    guess = mcnemar_pairs_normal(discordant, abs(delta), alpha, target)
    hi = max(2, guess)
    while mcnemar_power(hi, discordant, delta, alpha) < target:
        if hi > most:
            return None
        hi *= 2
    lo = min(hi - 1, guess // 2)
    while lo > 0 and mcnemar_power(lo, discordant, delta, alpha) >= target:
        lo //= 2
    while hi - lo > 1:  # power(lo) < target <= power(hi); power(0) = 0
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mcnemar_power(mid, discordant, delta, alpha) < target else (lo, mid)
    return hi


# ----------------------------------------------------------------------------------------------------
# the t distribution (central and noncentral) by quadrature over S = sqrt(chi2_nu / nu)

@functools.lru_cache(maxsize=None)
def chi_nodes(nu, intervals=2000):
    """(s, weight) pairs: Simpson's rule times the density of S = sqrt(chi2_nu / nu), normalised to sum to 1.
    f_S(s) = 2 (nu/2)^(nu/2) s^(nu-1) exp(-nu s^2 / 2) / Gamma(nu/2); the range covers 20 sd (~1/sqrt(2 nu))."""
    spread = 20 / math.sqrt(2 * nu)
    lo, hi = max(0.0, 1 - spread), 1 + spread
    h = (hi - lo) / intervals
    log_const = math.log(2) + nu / 2 * math.log(nu / 2) - math.lgamma(nu / 2)
    nodes = []
    for j in range(intervals + 1):
        s = lo + j * h
        if s == 0:
            density = math.exp(log_const) if nu == 1 else 0.0
        else:
            density = math.exp(log_const + (nu - 1) * math.log(s) - nu * s * s / 2)
        nodes.append((s, density * h / 3 * (1 if j in (0, intervals) else 4 if j % 2 else 2)))
    total = math.fsum(w for _, w in nodes)
    return tuple((s, w / total) for s, w in nodes)


def nct_cdf(t, nu, ncp=0.0):
    """P(T <= t) for T = (Z + ncp) / S, the noncentral t with nu degrees of freedom (ncp = 0: Student's t)."""
    return math.fsum(w * norm_cdf(t * s - ncp) for s, w in chi_nodes(nu))


@functools.lru_cache(maxsize=None)
def t_quantile(p, nu):
    """Student's t quantile, p > 0.5, by bisection on nct_cdf."""
    lo, hi = 0.0, 1.0
    while nct_cdf(hi, nu) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if nct_cdf(mid, nu) < p else (lo, mid)
    return (lo + hi) / 2


def t_test_power(delta, sd, k, alpha=ALPHA):
    """Power of the two-sided one-sample t-test at `alpha` of k seeds' ΔDS against 0, true mean delta and
    seed-to-seed standard deviation sd (noncentral t, module docstring). None below 2 seeds or at sd = 0."""
    if k < 2 or not sd:
        return None
    nu, ncp = k - 1, abs(delta) * math.sqrt(k) / sd
    c = t_quantile(1 - alpha / 2, nu)
    return math.fsum(w * (norm_cdf(ncp - c * s) + norm_cdf(-c * s - ncp)) for s, w in chi_nodes(nu))


def seeds_needed(delta, sd, alpha=ALPHA, target=TARGET, most=10 ** 5):
    """The fewest seeds (>= 2) whose t-test reaches `target` power; None at sd = 0 or above `most` seeds."""
    if not sd or delta == 0:
        return None
    power = lambda k: t_test_power(delta, sd, k, alpha)  # noqa: E731
    hi = 2
    while power(hi) < target:
        if hi > most:
            return None
        hi *= 2
    lo = hi // 2 if hi > 2 else 1  # power(1) is no test at all
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if power(mid) < target else (lo, mid)
    return hi


# ----------------------------------------------------------------------------------------------------
# ordinary least squares with its t interval

def ols(xs, ys, level=0.95):
    """Slope and intercept of y on x, the slope's standard error and `level` interval (t with m - 2 degrees of
    freedom), and the fitted line's interval at the smallest and largest x. None below 3 points or one x."""
    m = len(xs)
    if m < 3 or len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    slope = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    s2 = math.fsum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys)) / (m - 2)
    se = math.sqrt(s2 / sxx)
    t = t_quantile(1 - (1 - level) / 2, m - 2)

    def band(x):
        fit, half = intercept + slope * x, t * math.sqrt(s2 * (1 / m + (x - mx) ** 2 / sxx))
        return {"x": x, "fit": fit, "ci": [fit - half, fit + half]}

    span = max(xs) - min(xs)
    return {"m": m, "slope": slope, "intercept": intercept, "se": se, "t": t, "ci": [slope - t * se, slope + t * se],
            "span": span, "change_ci": [(slope - t * se) * span, (slope + t * se) * span],
            "band": [band(min(xs)), band(max(xs))]}


# ----------------------------------------------------------------------------------------------------
# reading finished runs

def read_predictions(stage_dir):
    path = Path(stage_dir) / "predictions.jsonl"
    return common.read_jsonl(path) if path.is_file() else None


def rung_label(weak, strong, intermediate, short):
    via = f" via {short.get(intermediate, intermediate)}" if intermediate else ""
    return f"{short.get(weak, weak)} -> {short.get(strong, strong)}{via}"


def measure(folder, config, delta, alpha, target):
    """One run's numbers from its stages' predictions, or a reason it is left out."""
    rows = {stage: read_predictions(folder / stage) for stage in STAGES}
    missing = [s for s, r in rows.items() if r is None]
    if missing:
        return None, f"no predictions.jsonl in {', '.join(missing)}"
    correct = {stage: [bool(row["correct"]) for row in r] for stage, r in rows.items()}
    if len({len(c) for c in correct.values()}) != 1:
        return None, "the stages' predictions.jsonl cover different numbers of test pairs"
    weak, strong, none, explicit = (correct[s] for s in STAGES)
    N = len(weak)
    strong_margin = [row["margin"] for row in rows["strong"]]
    matched = dose.margin_strata(weak, strong, strong_margin, none, {"explicit": explicit})["explicit"]
    tiers = None
    order = arith.tiers_of_run(config)  # arith.py records each test pair's tier
    if order is not None:
        if len(order) != N:
            return None, f"config.json gives a test split of {len(order)} pairs, the predictions cover {N}"
        tiers = {}
        for tier in [t for t in arith.TIERS if t in order]:
            ch = dose.changes_on([i for i, t in enumerate(order) if t == tier], weak, strong, none, explicit)
            tiers[tier] = {"n": ch[common.WU_SK]["n"], "delta_ds": ch[common.WU_SK]["net"],
                           "delta_err_wk_sk": ch[common.WK_SK]["net"]}
    space = {s: common.knowledge_space(weak, strong, correct[f"student-{s}"]) for s in ("none", "explicit")}
    wu_sk = space["none"]["areas"][common.WU_SK]
    n = wu_sk["n"]
    tax = common.conflict_tax(weak, strong, none, explicit)["areas"][common.WU_SK]
    b, c = tax["taxed"], tax["fixed"]
    acc_w, acc_s = sum(weak) / N, sum(strong) / N
    wu = N - sum(weak)
    psi = (b + c) / n if n else None
    power = mcnemar_power(n, psi, delta, alpha) if psi is not None and psi >= delta else None
    pairs = mcnemar_pairs_needed(psi, delta, alpha, target) if psi else None
    return {
        "dir": folder.name, "weak": config.get("weak"), "strong": config.get("strong"),
        "intermediate": config.get("intermediate") or "", "alpha": config.get("alpha"), "seed": config.get("seed"),
        "n_test": N, "acc_weak": acc_w, "acc_strong": acc_s, "gap": acc_s - acc_w,
        "n": n, "share_wu_sk": n / N, "share_wu_sk_independent": (1 - acc_w) * acc_s,
        "overlap": (wu - n) / wu if wu else None, "overlap_independent": 1 - acc_s,
        "ds_none": space["none"]["ds"], "ds_explicit": space["explicit"]["ds"],
        "err_wk_sk_none": space["none"]["err_wk_sk"], "err_wk_sk_explicit": space["explicit"]["err_wk_sk"],
        "delta_err_wk_sk": (space["explicit"]["err_wk_sk"] - space["none"]["err_wk_sk"]
                            if space["none"]["err_wk_sk"] is not None else None),  # None: no pair in WK ∩ SK
        "matched": matched["difference"], "matched_ci": matched["difference_ci"],
        "b": b, "c": c, "discordant": psi, "delta_ds": (b - c) / n if n else None,
        "p": common.mcnemar_exact(b, c), "power": power,
        "min_delta": mcnemar_min_delta(n, psi, alpha, target) if psi else None,
        "pairs_needed": pairs, "test_needed": math.ceil(pairs / (n / N)) if pairs and n else None,
        "tiers": tiers, "correct": correct,
    }, None


def load(root, delta, alpha, target):
    """The measured runs under `root` (a churn run, with a second no-conflict student only, is named and left out)
    and the left-out folders with their reasons."""
    measured, left_out = [], []
    for folder in sweep.run_folders([root]):
        config = sweep.read_json(folder / "config.json")
        if not isinstance(config, dict):
            left_out.append({"dir": folder.name, "reason": "config.json does not read as a run's options"})
            continue
        if config.get("student_seed", -1) >= 0:
            left_out.append({"dir": folder.name, "reason": "churn run (a second no-conflict student, no conflict)"})
            continue
        run, reason = measure(folder, config, delta, alpha, target)
        if run is None:
            left_out.append({"dir": folder.name, "reason": reason})
        else:
            measured.append(run)
    return measured, left_out


# ----------------------------------------------------------------------------------------------------
# the folder's findings

def t_summary(values):
    """Mean, sample SD, the mean's 95% t interval and the one-sample t-test's two-sided p against 0 of per-seed
    values (interval and p: None below 2 seeds or at SD 0)."""
    k = len(values)
    mean = statistics.fmean(values) if values else None
    sd = statistics.stdev(values) if k > 1 else None
    ci = p = None
    if sd:
        se = sd / math.sqrt(k)
        half = t_quantile(0.975, k - 1) * se
        ci, p = [mean - half, mean + half], min(1.0, 2 * (1 - nct_cdf(abs(mean) / se, k - 1)))
    return {"values": values, "mean": mean, "sd": sd, "ci": ci, "p": p}


def across_seeds(group, delta, alpha, target):
    """ΔDS over a configuration's seeds with the t-test's power; beside it the same t summary of the change of the
    error where the supervisor can check (WK ∩ SK) and of the difficulty-matched difference (tools/dose.py)."""
    t = t_summary([r["delta_ds"] for r in group if r["delta_ds"] is not None])
    sd = t["sd"]
    per_tier = {}  # arithmetic runs: the same two summaries inside each tier
    for r in group:
        for tier, row in (r["tiers"] or {}).items():
            per_tier.setdefault(tier, []).append(row)
    tiers = {tier: {"n": statistics.fmean(row["n"] for row in rows),
                    "delta_ds": t_summary([row["delta_ds"] for row in rows if row["delta_ds"] is not None]),
                    "wk_sk": t_summary([row["delta_err_wk_sk"] for row in rows if row["delta_err_wk_sk"] is not None])}
             for tier, rows in per_tier.items()}
    return {"seeds": [r["seed"] for r in group], "delta_ds": t["values"], "mean": t["mean"], "sd": sd, "ci": t["ci"],
            "p": t["p"], "t_power": t_test_power(delta, sd, len(t["values"]), alpha) if sd else None,
            "seeds_needed": seeds_needed(delta, sd, alpha, target) if sd else None,
            "wk_sk": t_summary([r["delta_err_wk_sk"] for r in group if r["delta_err_wk_sk"] is not None]),
            "matched": t_summary([r["matched"] for r in group if r["matched"] is not None]), "tiers": tiers}


def bootstrapping(measured):
    """Each bootstrapped run beside the direct run of the same weak and strong model, alpha and seed: raw DS of
    both students, and (where both runs share the ceilings' predictions) McNemar on the pairs of WU ∩ SK between
    the bootstrapped and the direct student."""
    direct = {(r["weak"], r["strong"], r["alpha"], r["seed"]): r for r in measured if not r["intermediate"]}
    rows = []
    for r in measured:
        d = direct.get((r["weak"], r["strong"], r["alpha"], r["seed"]))
        if not r["intermediate"] or d is None:
            continue
        same = all(r["correct"][s] == d["correct"][s] for s in ("weak", "strong"))
        row = {"weak": r["weak"], "strong": r["strong"], "intermediate": r["intermediate"], "alpha": r["alpha"],
               "seed": r["seed"], "dir": r["dir"], "direct_dir": d["dir"], "same_ceilings": same,
               "delta_ds": r["delta_ds"], "delta_ds_direct": d["delta_ds"]}
        for s in ("none", "explicit"):
            row[f"ds_{s}"], row[f"ds_{s}_direct"] = r[f"ds_{s}"], d[f"ds_{s}"]
            if same:
                masks = common.area_masks(r["correct"]["weak"], r["correct"]["strong"])[common.WU_SK].tolist()
                pairs = [(x, y) for x, y, m in zip(d["correct"][f"student-{s}"], r["correct"][f"student-{s}"], masks)
                         if m]
                worse, better = sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs)
                row[f"p_{s}"] = common.mcnemar_exact(worse, better)
        rows.append(row)
    summary = {s: {"falls": sum(row[f"ds_{s}"] < row[f"ds_{s}_direct"] for row in rows), "seeds": len(rows)}
               for s in ("none", "explicit")}
    return {"rows": rows, **summary}


def sign_p(k, m):
    """Two-sided exact sign-test p of k positives among m nonzero values (Binomial(m, 1/2))."""
    return common.mcnemar_exact(k, m - k)


def summarize(root, delta=DELTA, alpha=ALPHA, target=TARGET):
    measured, left_out = load(root, delta, alpha, target)
    if not measured:
        raise SystemExit(f"error: {root}: no run folder with weak, strong, student-none and student-explicit "
                         "predictions")
    short = sweep.short_models(r[k] for r in measured for k in ("weak", "strong", "intermediate"))
    for r in measured:
        r["rung"] = rung_label(r["weak"], r["strong"], r["intermediate"], short)
    groups = {}
    for r in sorted(measured, key=lambda r: (r["seed"] is None, r["seed"] or 0)):
        groups.setdefault((r["rung"], r["alpha"]), []).append(r)
    configs = sorted(({"rung": rung, "alpha": a, "gap": statistics.fmean(r["gap"] for r in group),
                       **across_seeds(group, delta, alpha, target)} for (rung, a), group in groups.items()),
                     key=lambda g: ("via" in g["rung"], g["gap"], -(g["alpha"] or 0)))

    def pooled(selected):
        dfs = [(len(g["delta_ds"]) - 1, g["sd"]) for g in selected if g["sd"] is not None]
        df = sum(f for f, _ in dfs)
        if not df:
            return None
        sd = math.sqrt(sum(f * s * s for f, s in dfs) / df)
        return {"configs": len(dfs), "df": df, "sd": sd, "t_power_3": t_test_power(delta, sd, 3, alpha),
                "seeds_needed": seeds_needed(delta, sd, alpha, target)}

    alphas = sorted({g["alpha"] for g in configs}, reverse=True)
    pooled_sd = {"all": pooled(configs), "direct": pooled([g for g in configs if "via" not in g["rung"]])}
    for a in alphas:
        pooled_sd[f"alpha {a:g}"] = pooled([g for g in configs if g["alpha"] == a])
        pooled_sd[f"alpha {a:g}, direct"] = pooled([g for g in configs if g["alpha"] == a and "via" not in g["rung"]])

    def fit(selected):
        selected = [r for r in selected if r["delta_ds"] is not None]
        return ols([r["gap"] for r in selected], [r["delta_ds"] for r in selected])

    direct = [r for r in measured if not r["intermediate"]]
    slopes = {"all runs": fit(measured), "direct runs": fit(direct)}
    for a in alphas:
        slopes[f"alpha {a:g}, direct runs"] = fit([r for r in direct if r["alpha"] == a])
        slopes[f"alpha {a:g}, all runs"] = fit([r for r in measured if r["alpha"] == a])
    widest = max((g for g in configs if "via" not in g["rung"]), key=lambda g: g["gap"], default=None)
    wide = None
    if widest is not None:
        students = [{"alpha": r["alpha"], "seed": r["seed"], "delta_ds": r["delta_ds"],
                     "delta_err_wk_sk": r["delta_err_wk_sk"], "p": r["p"]}
                    for r in sorted(direct, key=lambda r: (-(r["alpha"] or 0), r["seed"] or 0))
                    if r["rung"] == widest["rung"]]
        positive, zero = (sum(s["delta_ds"] > 0 for s in students), sum(s["delta_ds"] == 0 for s in students))
        wide = {"rung": widest["rung"], "students": students, "positive": positive,
                "all_positive": positive == len(students), "sign_p": sign_p(positive, len(students) - zero),
                "err_wk_sk_rises": sum((s["delta_err_wk_sk"] or 0) > 0 for s in students)}
    boot = bootstrapping(measured)
    for r in measured:
        del r["correct"]
    return {"root": str(root), "delta": delta, "alpha": alpha, "target": target, "runs": measured,
            "configs": configs, "pooled_sd": pooled_sd, "slopes": slopes, "bootstrapping": boot, "widest": wide,
            "left_out": left_out, "models": sweep.models_note(short)}


# ----------------------------------------------------------------------------------------------------
# power.md

def interval(ci, digits=3):
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def render(result):
    d, a, pct, fmt = result["delta"], result["alpha"], f"{result['target']:.0%}", runs.fmt
    lines = [f"Power of the ΔDS tests in `{result['root']}` (formulas: the docstring of tools/power.py). ΔDS = "
             "DS(explicit) − DS(no conflict) over the same pairs of weak-unknown ∩ strong-known (WU ∩ SK); McNemar's "
             f"exact test (two-sided, {a:g}) on its discordant pairs; power by exact enumeration, for a ΔDS of {d:g} at "
             "the measured n and discordant share. " + result["models"], "",
             "## Per run", "",
             "n: pairs in WU ∩ SK (their share of the test pairs; the share if the ceilings erred independently); "
             "r: P(strong wrong | weak wrong) (independent: 1 − strong accuracy); b / c: WU ∩ SK pairs only the explicit "
             f"/ only the no-conflict student gets wrong; the smallest ΔDS with {pct} power at this n and discordant "
             f"share; the WU ∩ SK pairs and test pairs that {pct} power at ΔDS {d:g} needs at this run's shares.", "",
             f"| rung | alpha | seed | gap | n (share; indep.) | r (indep.) | b / c | discordant | ΔDS | McNemar p | "
             f"power at {d:g} | smallest ΔDS at {pct} | pairs / test pairs needed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {(g["rung"], g["alpha"]): i for i, g in enumerate(result["configs"])}
    for r in sorted(result["runs"], key=lambda r: (order[(r["rung"], r["alpha"])], r["seed"] or 0)):
        lines.append(
            f"| {r['rung']} | {r['alpha']:g} | {r['seed']} | {r['gap']:.3f} | {r['n']} ({r['share_wu_sk']:.3f}; "
            f"{r['share_wu_sk_independent']:.3f}) | {fmt(r['overlap'])} ({r['overlap_independent']:.3f}) | "
            f"{r['b']} / {r['c']} | {fmt(r['discordant'])} | {r['delta_ds']:+.3f} | {r['p']:.2g} | {fmt(r['power'])} | "
            f"{fmt(r['min_delta'])} | {r['pairs_needed'] or '–'} / {r['test_needed'] or '–'} |")

    def summary_cells(t):  # per-seed values, mean ± SD [95% CI], t-test p
        per_seed = ", ".join(f"{v:+.3f}" for v in t["values"]) or "–"
        if t["mean"] is None:
            return [per_seed, "–", "–"]
        return [per_seed, f"{t['mean']:+.3f} ± {fmt(t['sd'])} {interval(t['ci']) if t['ci'] else ''}".rstrip(),
                f"{t['p']:.2g}" if t["p"] is not None else "–"]

    lines += ["", "## Across seeds", "",
              "Mean, sample SD and 95% t interval of ΔDS over seeds, and the one-sample t-test's p against 0; the power "
              f"of that test (two-sided, {a:g}) for a true ΔDS of {d:g} with this SD and this many seeds (noncentral t), "
              f"and the seeds {pct} needs.", "",
              f"| rung | alpha | gap | seeds | ΔDS per seed | mean ± SD [95% CI] | t-test p | t-test power at {d:g} | "
              f"seeds for {pct} |", "|---|---|---|---|---|---|---|---|---|"]
    for g in result["configs"]:
        cells = summary_cells({**g, "values": g["delta_ds"]})
        lines.append(f"| {g['rung']} | {g['alpha']:g} | {g['gap']:.3f} | {len(g['delta_ds'])} | " + " | ".join(cells)
                     + f" | {fmt(g['t_power'])} | {g['seeds_needed'] or '–'} |")
    lines += ["", "The SD pooled over configurations (variances weighted by their degrees of freedom), and what it gives:",
              "", f"| configurations | count | df | pooled SD | t-test power with 3 seeds | seeds for {pct} |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {p['configs']} | {p['df']} | {p['sd']:.4f} | {fmt(p['t_power_3'])} | {p['seeds_needed'] or '–'} |"
              for label, p in result["pooled_sd"].items() if p]

    lines += ["", "Where the supervisor can check, and matched on difficulty: per seed the change of the explicit "
              "student's error in weak-known ∩ strong-known (WK ∩ SK), and the difference of the net changes, WU ∩ SK "
              "minus WK ∩ SK, within bins of the strong ceiling's margin (`tools/dose.py`: pairs the weak model misses "
              "are harder, and any perturbation costs more on hard pairs); mean ± SD [95% t interval] and the t-test's "
              "p against 0. Selective deception: ΔDS above 0 while WK ∩ SK holds, and a matched difference above 0.",
              "", "| rung | alpha | WK ∩ SK change per seed | mean ± SD [95% CI] | t-test p | matched difference per "
              "seed | mean ± SD [95% CI] | t-test p |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {g['rung']} | {g['alpha']:g} | " + " | ".join(summary_cells(g["wk_sk"]) + summary_cells(g["matched"]))
              + " |" for g in result["configs"]]
    if any(g["tiers"] for g in result["configs"]):
        lines += ["", "Per tier (arithmetic runs): ΔDS inside each tier's WU ∩ SK pairs (their mean count over seeds) and "
                  "the change of the error in the tier's WK ∩ SK pairs, per seed, mean ± SD [95% t interval] and the "
                  "t-test's p against 0: does a finding hold on every tier, or on one?", "",
                  "| rung | alpha | tier | WU ∩ SK pairs | ΔDS per seed | mean ± SD [95% CI] | t-test p | WK ∩ SK change "
                  "per seed | mean ± SD [95% CI] | t-test p |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {g['rung']} | {g['alpha']:g} | {tier} | {t['n']:.0f} | "
                  + " | ".join(summary_cells(t["delta_ds"]) + summary_cells(t["wk_sk"])) + " |"
                  for g in result["configs"] for tier, t in g["tiers"].items()]

    lines += ["", "## ΔDS against the capability gap", "",
              "Ordinary least squares over runs (a run's gap: strong − weak ceiling test accuracy); the slope's 95% "
              "interval (t on m − 2 df); the change of ΔDS that interval allows across the measured gaps (interval × "
              "(largest − smallest gap)); the fitted line's 95% interval at the smallest and the largest gap.", "",
              "| runs | m | slope [95% CI] | change allowed over the gaps | fit at the smallest gap | fit at the largest gap |",
              "|---|---|---|---|---|---|"]
    for label, s in result["slopes"].items():
        if s:
            ends = [f"{e['fit']:+.3f} {interval(e['ci'])} at {e['x']:.3f}" for e in s["band"]]
            lines.append(f"| {label} | {s['m']} | {s['slope']:+.2f} {interval(s['ci'], 2)} | "
                         f"{interval(s['change_ci'])} over {s['span']:.3f} | {ends[0]} | {ends[1]} |")

    boot = result["bootstrapping"]
    if boot["rows"]:
        rungs = {r["dir"]: r["rung"] for r in result["runs"]}
        lines += ["", "## Raw DS through bootstrapping", "",
                  "Each bootstrapped run beside the direct run of the same models, alpha and seed; McNemar's p between the "
                  "bootstrapped and the direct student on the same WU ∩ SK pairs (where both runs share the ceilings).", "",
                  "| rung | alpha | seed | DS no conflict: direct → bootstrapped (p) | DS explicit: direct → bootstrapped (p) "
                  "| ΔDS: direct → bootstrapped |", "|---|---|---|---|---|---|"]
        for row in boot["rows"]:
            cells = [f"{row[f'ds_{s}_direct']:.3f} → {row[f'ds_{s}']:.3f}"
                     + (f" ({row[f'p_{s}']:.2g})" if row["same_ceilings"] else "") for s in ("none", "explicit")]
            lines.append(f"| {rungs[row['dir']]} | {row['alpha']:g} | {row['seed']} | {cells[0]} | {cells[1]} | "
                         f"{row['delta_ds_direct']:+.3f} → {row['delta_ds']:+.3f} |")
        lines += ["", f"Raw DS falls through bootstrapping on {boot['none']['falls']} of {boot['none']['seeds']} seeds "
                  f"without the conflict and on {boot['explicit']['falls']} of {boot['explicit']['seeds']} with it."]

    w = result["widest"]
    if w:
        lines += ["", f"## The widest rung, {w['rung']}: every explicit student", "",
                  "| alpha | seed | ΔDS | McNemar p | change of the error in WK ∩ SK |", "|---|---|---|---|---|"]
        lines += [f"| {s['alpha']:g} | {s['seed']} | {s['delta_ds']:+.3f} | {s['p']:.2g} | "
                  f"{'–' if s['delta_err_wk_sk'] is None else format(s['delta_err_wk_sk'], '+.3f')} |"
                  for s in w["students"]]
        lines += ["", f"ΔDS > 0 for {w['positive']} of {len(w['students'])} explicit students (two-sided sign-test p "
                  f"{w['sign_p']:.3g}, which overstates the evidence: the students of one seed share their ceilings and "
                  f"no-conflict student); the error in WK ∩ SK rises for {w['err_wk_sk_rises']} of them."]
    if result["left_out"]:
        lines += ["", "Left out: " + "; ".join(f"`{x['dir']}` ({x['reason']})" for x in result["left_out"]) + "."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# planning from calibrated ceilings

def plan(weak_acc, strong_acc, discordant=0.2, delta=DELTA, sd=0.03, target=TARGET, overlap=None, alpha=ALPHA):
    """The module docstring's plan: WU ∩ SK share, pairs and test pairs for McNemar, seeds for the t-test."""
    r = 1 - strong_acc if overlap is None else overlap
    share = (1 - weak_acc) * (1 - r)
    pairs = mcnemar_pairs_needed(discordant, delta, alpha, target)
    return {"weak_acc": weak_acc, "strong_acc": strong_acc, "overlap": r, "independent": overlap is None,
            "share_wu_sk": share, "discordant": discordant, "delta": delta, "sd": sd, "target": target, "alpha": alpha,
            "pairs": pairs, "pairs_normal": mcnemar_pairs_normal(discordant, delta, alpha, target),
            "power_at_pairs": mcnemar_power(pairs, discordant, delta, alpha) if pairs else None,
            "test_pairs": math.ceil(pairs / share) if pairs and share > 0 else None,
            "seeds": seeds_needed(delta, sd, alpha, target),
            "t_power": {k: t_test_power(delta, sd, k, alpha) for k in (3, 5)}}


def render_plan(p):
    why = "assumed: the ceilings err independently" if p["independent"] else "given by --overlap"
    rows = [("weak / strong ceiling accuracy", f"{p['weak_acc']:g} / {p['strong_acc']:g}"),
            ("r = P(strong wrong \\| weak wrong)", f"{p['overlap']:.3f} ({why})"),
            ("expected share of test pairs in WU ∩ SK = (1 − weak) (1 − r)", f"{p['share_wu_sk']:.3f}"),
            (f"pairs in WU ∩ SK for {p['target']:.0%} McNemar power (ΔDS {p['delta']:g}, discordant {p['discordant']:g})",
             f"{p['pairs']} (power {runs.fmt(p['power_at_pairs'])}; normal approximation {p['pairs_normal']})"),
            ("test pairs needed", f"{p['test_pairs']}"),
            (f"seeds for {p['target']:.0%} t-test power (ΔDS {p['delta']:g}, SD {p['sd']:g})", f"{p['seeds']}"),
            ("t-test power with 3 / 5 seeds", f"{runs.fmt(p['t_power'][3])} / {runs.fmt(p['t_power'][5])}")]
    return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


# ----------------------------------------------------------------------------------------------------

def parse_cli(argv):
    p = argparse.ArgumentParser(description="Power of the ΔDS tests: of finished runs (FOLDER), or planned (--plan).")
    p.add_argument("folder", nargs="?", help="a folder of run folders (results/ladder)")
    p.add_argument("--out", help="where power.md and power.json go (default: the folder)")
    p.add_argument("--plan", action="store_true", help="plan from calibrated ceilings instead of reading runs")
    p.add_argument("--weak_acc", type=float, help="--plan: the weak ceiling's accuracy")
    p.add_argument("--strong_acc", type=float, help="--plan: the strong ceiling's accuracy")
    p.add_argument("--overlap", type=float, help="--plan: measured P(strong wrong | weak wrong) (default: independence)")
    p.add_argument("--discordant", type=float, default=0.2, help="--plan: the discordant share in WU ∩ SK")
    p.add_argument("--sd", type=float, default=0.03, help="--plan: the seed-to-seed SD of ΔDS")
    p.add_argument("--delta", type=float, default=DELTA, help="the ΔDS to detect")
    p.add_argument("--power", type=float, default=TARGET, help="the power wanted")
    p.add_argument("--alpha", type=float, default=ALPHA, help="the tests' level (two-sided)")
    cli = p.parse_args(argv)
    if cli.plan == bool(cli.folder):
        p.error("give a FOLDER of runs, or --plan with --weak_acc and --strong_acc")
    if cli.plan and (cli.weak_acc is None or cli.strong_acc is None):
        p.error("--plan needs --weak_acc and --strong_acc")
    return cli


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cli = parse_cli(argv)
    if cli.plan:
        print(render_plan(plan(cli.weak_acc, cli.strong_acc, cli.discordant, cli.delta, cli.sd, cli.power, cli.overlap,
                               cli.alpha)))
        return
    root = Path(cli.folder)
    out = Path(cli.out) if cli.out else root
    result = summarize(root, cli.delta, cli.alpha, cli.power)
    out.mkdir(parents=True, exist_ok=True)
    text = f"`python tools/power.py {' '.join(argv)}`\n\n" + render(result)
    runs.write_json(out / "power.json", result)
    runs.write_atomic(out / "power.md", text)
    print(text)
    print(f"wrote {out / 'power.md'} and {out / 'power.json'}")


if __name__ == "__main__":
    main()
