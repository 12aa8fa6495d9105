"""The arithmetic testbed (`--data arith`): preference pairs where capability, not taste, decides.

A pair asks one arithmetic question in the HH layout and answers it twice, rightly (chosen) and with a near
miss (rejected):

    "\\n\\nHuman: What is 47 + 38?\\n\\nAssistant: The answer is 85."   against   "... The answer is 86."

- Near misses: the right answer plus one of NEAR_MISS_OFFSETS (±1, ±2, ±10, ±100), drawn uniformly among those
  that keep the answer's number of digits and stay within the tier's range of answers. Both responses have
  the same characters but one or two digits, so neither length nor format tells them apart: "prefer the
  shorter response" decides no pair (the report counts every pair as equal length, which it scores as wrong),
  a tokenizer that splits digits (SmolLM2, Qwen2.5, Gemma 3) gives both the same number of tokens, and
  "prefer the smaller number" is right on about half of each tier's pairs.
- Tiers (TIERS): two- and three-digit addition, three-digit subtraction, three-digit times one-digit and
  two-digit times two-digit, in equal shares in every split (the first n % 5 tiers get one pair more), so a
  weak model can know some tiers and a strong one more. Each pair records its tier ("tier"); the report's
  predictions.jsonl row i is test pair i, so tiers_of_test_split reads a run's results per tier.
- Splits are disjoint by question, the order of the operands of + and * included (47 + 38 and 38 + 47 are one
  question). Each tier draws distinct questions from its own seeded stream: first VAL_PER_TIER questions kept
  for the validation split, then gt, w2s and test in that order. So gt does not depend on --n_w2s or --n_test,
  and the validation split depends on nothing but the seed and never meets a training or test pair.
- `--data arith:val` makes the test split the validation one (the first n_test // 5 kept questions per tier;
  at most 5 * VAL_PER_TIER pairs), with the same gt and w2s splits as `--data arith`: a calibration run trains
  on the gt split it will later use and scores on pairs no run tests on.

No implicit conflict: it needs a second objective whose preferred responses pull against correctness on the
same kind of request, as helpfulness pulls against harmlessness. In arithmetic helpfulness is correctness; an
invented one (agree with a guess the user states, say) would ask about other prompts and measure how far a
learnt habit transfers, not the paper's conflict. common.load_splits refuses `--settings implicit` for arith
with NO_IMPLICIT; the explicit conflict reads only the ground truth and is defined.

Deterministic from the seed, in the style of toy.make_toy_pairs. It imports nothing of the project's; nothing
here runs at import time.
"""
import random

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"  # the HH format, as in common.py

# tier: (operator, first operand's range, second operand's range), ranges inclusive
TIERS = {
    "add2": ("+", (10, 99), (10, 99)),  # two-digit + two-digit
    "add3": ("+", (100, 999), (100, 999)),  # three-digit + three-digit
    "sub3": ("-", (100, 999), (100, 999)),  # three-digit - three-digit, the difference at least MIN_DIFFERENCE
    "mul31": ("*", (100, 999), (2, 9)),  # three-digit * one-digit (2 to 9: times 0 or 1 asks nothing)
    "mul22": ("*", (10, 99), (10, 99)),  # two-digit * two-digit
}
MIN_DIFFERENCE = 10  # every answer has at least two digits, so each has near misses of its own length
NEAR_MISS_OFFSETS = (-100, -10, -2, -1, 1, 2, 10, 100)
VAL_PER_TIER = 400  # questions per tier kept for the validation split: 2000 pairs, +-0.022 on an accuracy of 0.5

NO_IMPLICIT = ("error: --data arith has no helpfulness pairs, so the implicit conflict is not defined for it "
               "(arith.py says why); use --settings none,explicit")


def capacity(tier):
    """How many distinct questions a tier holds (operands of + and * unordered)."""
    op, (lo1, hi1), (lo2, hi2) = TIERS[tier]
    if op == "-":
        return sum(max(0, min(hi2, a - MIN_DIFFERENCE) - lo2 + 1) for a in range(lo1, hi1 + 1))
    if (lo1, hi1) == (lo2, hi2):
        m = hi1 - lo1 + 1
        return m * (m + 1) // 2
    return (hi1 - lo1 + 1) * (hi2 - lo2 + 1)  # the ranges do not overlap: no question is counted twice


def answer_range(tier):
    """The smallest and the largest answer of a tier's questions."""
    op, (lo1, hi1), (lo2, hi2) = TIERS[tier]
    return {"+": (lo1 + lo2, hi1 + hi2), "-": (MIN_DIFFERENCE, hi1 - lo2), "*": (lo1 * lo2, hi1 * hi2)}[op]


def near_miss(rng, answer, tier):
    """The answer plus an offset drawn among those that keep its number of digits and stay in the tier's range
    of answers (no sum of two two-digit numbers is 200 or more: a near miss there would be told by its size)."""
    digits, (low, high) = len(str(answer)), answer_range(tier)
    return answer + rng.choice([d for d in NEAR_MISS_OFFSETS
                                if 10 ** (digits - 1) <= answer + d < 10 ** digits and low <= answer + d <= high])


def arith_pair(rng, tier, seen):
    """One pair of `tier` whose question is not in `seen` (then added to it)."""
    op, (lo1, hi1), (lo2, hi2) = TIERS[tier]
    while True:
        a, b = rng.randint(lo1, hi1), rng.randint(lo2, hi2)
        if op == "-" and a - b < MIN_DIFFERENCE:
            continue
        question = (a, b) if op == "-" else tuple(sorted((a, b)))
        if question not in seen:
            break
    seen.add(question)
    if op != "-" and rng.random() < 0.5:  # the printed order is free; a one-digit factor comes first half the time
        a, b = b, a
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    prompt = f"{HUMAN} What is {a} {op} {b}?{ASSISTANT}"
    miss = near_miss(rng, answer, tier)
    return {"chosen": f"{prompt} The answer is {answer}.", "rejected": f"{prompt} The answer is {miss}.", "tier": tier}


def tier_counts(n):
    """n pairs in equal shares over the tiers, the first n % len(TIERS) tiers one more."""
    q, r = divmod(n, len(TIERS))
    return {tier: q + (i < r) for i, tier in enumerate(TIERS)}


def make_arith_pairs(n, seed, validation=False):
    """{"gt", "w2s", "test": pairs} for n = {"gt": count, "w2s": count, "test": count}, deterministic from the
    seed; with validation=True the test split is drawn from the validation questions. Each split is shuffled so
    that its tiers are mixed."""
    counts = {split: tier_counts(k) for split, k in n.items()}
    if validation and n["test"] > VAL_PER_TIER * len(TIERS):
        raise SystemExit(f"error: --data arith:val holds {VAL_PER_TIER * len(TIERS)} validation pairs; "
                         f"--n_test {n['test']} asks for more")
    pools = {split: [] for split in n}
    front = [split for split in ("gt", "w2s", "test") if not (validation and split == "test")]
    for tier in TIERS:
        wanted = sum(counts[split][tier] for split in front)
        if VAL_PER_TIER + wanted > capacity(tier):
            room = (capacity(tier) - VAL_PER_TIER) * len(TIERS)
            raise SystemExit(f"error: --data arith: tier {tier} holds {capacity(tier)} distinct questions, "
                             f"{VAL_PER_TIER} of them kept for validation; the splits ask for {wanted} of the rest "
                             f"(at most about {room} pairs in all)")
        rng, seen = random.Random(f"arith-{seed}-{tier}"), set()
        kept = [arith_pair(rng, tier, seen) for _ in range(VAL_PER_TIER)]  # first, so that nothing else moves them
        for split in ("gt", "w2s", "test"):
            if split in front:
                pools[split] += [arith_pair(rng, tier, seen) for _ in range(counts[split][tier])]
            else:
                pools[split] += kept[:counts[split][tier]]
    for split, pairs in pools.items():
        random.Random(f"arith-{seed}-{split}-order").shuffle(pairs)
    return pools


def tiers_of_test_split(config):
    """The tier of each test pair of a run, from its config.json (predictions.jsonl row i is test pair i)."""
    n = {"gt": config["n_gt"], "w2s": config["n_w2s"], "test": config["n_test"]}
    return [p["tier"] for p in make_arith_pairs(n, config["seed"], config["data"] == "arith:val")["test"]]


def tiers_of_run(config):
    """tiers_of_test_split for a run on arith (or arith:val), None for a run on any other source."""
    return tiers_of_test_split(config) if str(config.get("data", "")).startswith("arith") else None
