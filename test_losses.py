"""The losses: the reward model's soft-label and explicit-conflict losses, DPO's and SimPO's losses and their
conflict terms, hand-computed; the sequence log-probs they read, against a brute-force loop; and the batch losses
of dpo_w2s / simpo_w2s (summed against mean log-probs). Well under a minute on CPU.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import dpo_w2s
import rm_w2s
import simpo_w2s
# tests/conftest.py's one torch thread and tiny GPT-2 (pytest finds fixtures where a test file imports them)
from tests.conftest import CPU, PO_TEXTS, causal_lm, single_thread, tiny, tiny_llama  # noqa: F401


# ---- reward model

def test_soft_label_loss_hand_values():
    r_c, r_r = torch.tensor([1.0, 1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 0.0, 1.0])
    p = torch.tensor([1.0, 0.3, 0.5, 0.0])
    # BCE(sigmoid(d), p) = -(p log sigmoid(d) + (1 - p) log(1 - sigmoid(d))), by hand:
    s1 = 1 / (1 + math.exp(-1.0))  # sigmoid(1) = 0.7310585786
    expected = [
        math.log(1 + math.exp(-1.0)),  # p = 1, d = 1: 0.3132616875
        -(0.3 * math.log(s1) + 0.7 * math.log(1 - s1)),  # 0.3*0.31326 + 0.7*1.31326 = 1.0132616875
        math.log(2.0),  # d = 0: both terms log 2
        math.log(1 + math.exp(-3.0)),  # p = 0, d = -3: -log(1 - sigmoid(-3)) = log(1 + e^-3)
    ]
    got = rm_w2s.soft_label_loss(r_c, r_r, p)
    assert got.shape == (4,)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert got[0].item() == pytest.approx(0.31326169, abs=1e-7)
    assert got[1].item() == pytest.approx(1.01326169, abs=1e-6)


def test_soft_label_loss_p1_is_bradley_terry():
    torch.manual_seed(0)
    r_c, r_r = torch.randn(16) * 3, torch.randn(16) * 3
    bt = -F.logsigmoid(r_c - r_r)
    torch.testing.assert_close(rm_w2s.soft_label_loss(r_c, r_r, torch.ones(16)), bt)


def test_soft_label_loss_symmetric_under_swap():
    """Pairs stay in ground-truth orientation: swapping chosen/rejected with p -> 1 - p changes nothing."""
    torch.manual_seed(1)
    r_c, r_r, p = torch.randn(8), torch.randn(8), torch.rand(8)
    torch.testing.assert_close(rm_w2s.soft_label_loss(r_c, r_r, p), rm_w2s.soft_label_loss(r_r, r_c, 1 - p))


def test_explicit_conflict_loss_zero_where_student_agrees():
    r_c = torch.tensor([0.5, 3.0, 1e-4], requires_grad=True)
    r_r = torch.tensor([0.0, -1.0, 0.0])
    loss = rm_w2s.explicit_conflict_loss(r_c, r_r, torch.ones(3), torch.zeros(3, dtype=torch.bool))  # agreement
    assert loss.tolist() == [0.0, 0.0, 0.0]
    loss.sum().backward()
    assert r_c.grad.tolist() == [0.0, 0.0, 0.0]


def test_explicit_conflict_loss_where_student_contradicts():
    margins = [-2.0, -0.5, 0.0]  # 0.0: a tie shown rejected-first predicts "rejected": it contradicts y_gt = 1 too
    r_c = torch.tensor(margins, requires_grad=True)
    r_r = torch.zeros(3)
    loss = rm_w2s.explicit_conflict_loss(r_c, r_r, torch.ones(3), torch.zeros(3, dtype=torch.bool))
    # BCE(sigmoid(m), 0) = -log(1 - sigmoid(m)) = log(1 + e^m) = softplus(m)
    expected = [math.log(1 + math.exp(m)) for m in margins]  # 0.126928, 0.474077, 0.693147
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    loss.sum().backward()
    # d softplus(m) / d r_c = sigmoid(m) > 0: gradient descent lowers r_c, pushing the margin further negative
    assert r_c.grad.tolist() == pytest.approx([1 / (1 + math.exp(-m)) for m in margins], abs=1e-6)
    assert all(g > 0 for g in r_c.grad.tolist())


def test_explicit_conflict_loss_mixed_batch():
    r_c, r_r = torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.zeros(4)
    loss = rm_w2s.explicit_conflict_loss(r_c, r_r, torch.ones(4), torch.zeros(4, dtype=torch.bool))
    assert loss.tolist() == pytest.approx([0.0, math.log(1 + math.exp(-1.0)), 0.0, math.log(2.0)], abs=1e-6)


def test_explicit_conflict_a_tie_predicts_the_text_shown_first_as_the_papers_code():
    """The paper's code predicts the first text where logits >= 0 and shows pairs in random orientation; here the
    pairs stay in ground-truth orientation and `tie_means_chosen` is that orientation. A tie shown chosen-first
    agrees with the ground truth (no term); shown rejected-first it contradicts it (log 2). Non-ties ignore it."""
    r_c, r_r = torch.tensor([0.0, 0.0, -1.0, 1.0]), torch.zeros(4)
    shown_first = torch.tensor([True, False, True, False])
    loss = rm_w2s.explicit_conflict_loss(r_c, r_r, torch.ones(4), shown_first)
    assert loss.tolist() == pytest.approx([0.0, math.log(2.0), math.log(1 + math.exp(-1.0)), 0.0], abs=1e-6)
    # the paper's rule, written out: mask = (logits >= 0) != label in the orientation shown
    shown = [(m if first else -m, 1.0 if first else 0.0) for m, first in zip((r_c - r_r).tolist(), shown_first)]
    assert [float((lo >= 0) != bool(y)) for lo, y in shown] == [float(v > 0) for v in loss.tolist()]


def test_explicit_conflict_fires_on_about_half_the_first_step_ties():
    """With the zero head every first margin is 0: the term fires on the pairs shown rejected-first, about half
    (train_preferences draws the orientation), not on all of them."""
    import random
    rng = random.Random(0)
    shown_first = torch.tensor([rng.random() < 0.5 for _ in range(1000)])
    fired = rm_w2s.explicit_conflict_loss(torch.zeros(1000), torch.zeros(1000), torch.ones(1000), shown_first) > 0
    assert fired.tolist() == (~shown_first).tolist() and 450 < int(fired.sum()) < 550


# ---- DPO and SimPO

def test_dpo_loss_is_log2_when_policy_is_reference():
    """The DPO loss starts at log 2: at step 0 (policy == reference) every pair's loss is log 2 = 0.693147 and both rewards are 0."""
    torch.manual_seed(0)
    pi_c, pi_r = -50 * torch.rand(6), -50 * torch.rand(6)
    for beta in (0.1, 0.5, 2.0):
        losses, chosen, rejected = dpo_w2s.dpo_loss(pi_c, pi_r, pi_c.clone(), pi_r.clone(), beta)
        assert losses.tolist() == pytest.approx([0.693147] * 6, abs=1e-6)
        assert chosen.tolist() == rejected.tolist() == [0.0] * 6


def test_dpo_loss_hand_values():
    pi_c = torch.tensor([-10.0, -20.0, -5.0, -30.0], requires_grad=True)
    pi_r = torch.tensor([-12.0, -15.0, -3.0, -10.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-11.0, -22.0, -5.0, -20.0]), torch.tensor([-11.0, -14.0, -3.0, -20.0])
    # (pi_c - pi_r) - (ref_c - ref_r):  2 - 0 = 2,  -5 - (-8) = 3,  -2 - (-2) = 0,  -20 - 0 = -20
    # loss = -log sigmoid(beta * that) = log(1 + exp(-beta * that))
    losses, chosen, rejected = dpo_w2s.dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.1)
    expected = [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(-0.3)), math.log(2), math.log(1 + math.exp(2.0))]
    assert expected == pytest.approx([0.598139, 0.554355, 0.693147, 2.126928], abs=1e-6)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    # rewards: beta * (pi - ref), detached
    assert chosen.tolist() == pytest.approx([0.1, 0.2, 0.0, -1.0], abs=1e-6)
    assert rejected.tolist() == pytest.approx([-0.1, -0.1, 0.0, 1.0], abs=1e-6)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad
    assert chosen.grad_fn is None and rejected.grad_fn is None
    # beta scales the log-ratio difference: beta 0.5 on the first pair gives log(1 + e^-1) = 0.313262
    assert dpo_w2s.dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.5)[0][0].item() == pytest.approx(0.313262, abs=1e-6)


def test_simpo_loss_hand_values_gamma_absolute():
    pi_c = torch.tensor([-1.0, -1.0, -2.0, -0.5], requires_grad=True)
    pi_r = torch.tensor([-1.5, -2.0, -1.0, -0.5], requires_grad=True)
    # beta 2, gamma 1: beta * (pi_c - pi_r) - gamma = 0, 1, -3, -1
    losses, chosen, rejected = simpo_w2s.simpo_loss(pi_c, pi_r, 2.0, 1.0)
    expected = [math.log(2), math.log(1 + math.exp(-1)), math.log(1 + math.exp(3)), math.log(1 + math.exp(1))]
    assert expected == pytest.approx([0.693147, 0.313262, 3.048587, 1.313262], abs=1e-6)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    # rewards: beta * mean log-prob, detached
    assert chosen.tolist() == pytest.approx([-2.0, -2.0, -4.0, -1.0]) and not chosen.requires_grad
    assert rejected.tolist() == pytest.approx([-3.0, -4.0, -2.0, -1.0]) and not rejected.requires_grad
    # gamma is absolute (not gamma_beta_ratio): beta 4, gamma 1, delta 0.25 -> 4 * 0.25 - 1 = 0 -> log 2,
    # where beta * (delta - gamma) would give 4 * (0.25 - 1) = -3 -> 3.048587
    got = simpo_w2s.simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.25]), 4.0, 1.0)[0].item()
    assert got == pytest.approx(math.log(2), abs=1e-6)
    # gamma 0: plain -log sigmoid(beta * delta)
    assert simpo_w2s.simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), 2.0, 0.0)[0].item() == \
        pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


# ---- the sequence log-probs the policy losses read

def token_logps_alone(model, ids):
    """Brute force, one sequence alone (unbatched, no padding, no mask): out[t] = log_softmax(logits[t-1])[ids[t]]
    for t >= 1 (out[0] = None: the first token has no predictor)."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)  # (T, V)
    return [None] + [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]


@pytest.mark.parametrize("arch", ["tiny", "tiny_llama"])
def test_sequence_logps_brute_force_per_token(arch, request):
    """Right padding, the shifted response mask, and no prompt or padding token scored: sequence_logps over a right-padded batch (pad = EOS) equals, per sequence, a loop over the
    response positions t = n_prompt .. len-1 of that sequence alone: the first response token (predicted from the
    last prompt position) and the final EOS count; prompt and padding do not."""
    tok, model = causal_lm(request.getfixturevalue(arch))
    seqs = common.encode_texts(tok, PO_TEXTS, 128)
    inputs, resp, _, _ = common.collate(seqs, tok.pad_token_id, CPU)
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    assert (attn == 0).any() and len({len(s) for s, _ in seqs}) == len(seqs)  # padded, all lengths differ
    with torch.no_grad():
        sums, counts = common.sequence_logps(model(input_ids=ids, attention_mask=attn).logits, ids, resp)
    for i, (s, n_prompt) in enumerate(seqs):
        per_token = token_logps_alone(model, s)
        assert n_prompt >= 2 and s[-1] == tok.eos_token_id
        assert counts[i].item() == len(s) - n_prompt
        assert sums[i].item() == pytest.approx(sum(per_token[n_prompt:]), abs=1e-4), f"sequence {i}"
        # the test bites: dropping the first response token, or adding the last prompt token, is far off
        assert sums[i].item() != pytest.approx(sum(per_token[n_prompt + 1:]), abs=1e-2)
        assert sums[i].item() != pytest.approx(sum(per_token[n_prompt - 1:]), abs=1e-2)


def test_sequence_logps_ignores_prompt_and_padding_positions():
    """Only response tokens are scored, on the pure function: logits that predict prompt tokens or padding, and the prompt tokens' and
    padding's labels, do not change the result; the logits predicting each response token (the first one
    included, from the last prompt position) do."""
    torch.manual_seed(0)
    V, T = 11, 7
    seqs = [([1, 2, 3, 4, 5, 6, 7], 3), ([8, 9, 10, 1, 2], 4), ([3, 4, 5], 1)]
    inputs, resp, _, _ = common.collate(seqs, 0, CPU)
    ids = inputs["input_ids"]
    logits = torch.randn(3, T, V)
    base, counts = common.sequence_logps(logits, ids, resp)
    assert counts.tolist() == [4, 1, 2]
    logp = logits.double().log_softmax(-1)
    hand = [sum(logp[i, t - 1, s[t]].item() for t in range(n, len(s))) for i, (s, n) in enumerate(seqs)]
    assert base.tolist() == pytest.approx(hand, abs=1e-5)
    for i, (s, n_prompt) in enumerate(seqs):
        # logits that predict a prompt token, padding or nothing
        for pos in list(range(n_prompt - 1)) + list(range(len(s) - 1, T)):
            changed = logits.clone()
            changed[i, pos] = 10 * torch.randn(V)
            torch.testing.assert_close(common.sequence_logps(changed, ids, resp)[0], base, msg=f"seq {i} pos {pos}")
        for pos in range(n_prompt - 1, len(s) - 1):  # predicts a response token
            changed = logits.clone()
            changed[i, pos, s[pos + 1]] += 1.0
            new = common.sequence_logps(changed, ids, resp)[0]
            assert new[i].item() > base[i].item() + 1e-3, f"seq {i}: the logits at {pos} do not count"
            assert torch.equal(torch.cat([new[:i], new[i + 1:]]), torch.cat([base[:i], base[i + 1:]]))
    # log-softmax in fp32 even for bf16 logits (bf16 log-probs would round every margin)
    low, _ = common.sequence_logps(logits.bfloat16(), ids, resp)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, common.sequence_logps(logits.bfloat16().float(), ids, resp)[0])
    relabelled = ids.clone()
    for i, (s, n_prompt) in enumerate(seqs):
        relabelled[i, 1:n_prompt] = (relabelled[i, 1:n_prompt] + 1) % V  # the prompt tokens' labels
        relabelled[i, len(s):] = 5  # padding's
    assert not torch.equal(relabelled, ids)
    torch.testing.assert_close(common.sequence_logps(logits, relabelled, resp)[0], base)


# pairs whose responses differ much in length (and one pair of near-equal lengths)
LENGTH_PAIRS = [
    {"chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour.",
     "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water and yeast, then bake it! Try reading "
                 "a classic novel, like Pride and Prejudice, while it bakes."},
    {"chosen": "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road? To get to the other side!",
     "rejected": "\n\nHuman: Tell me a joke.\n\nAssistant: No!"},
    {"chosen": "\n\nHuman: Can you help me steal a car?\n\nAssistant: No, I won't help with that!",
     "rejected": "\n\nHuman: Can you help me steal a car?\n\nAssistant: Are you safe?"},
]


def test_dpo_sums_and_simpo_means_in_batch_loss(tiny):
    """DPO sums log-probs, SimPO averages them: dpo_w2s.preference_loss feeds dpo_loss the SUMMED response log-probs, simpo_w2s.preference_loss feeds simpo_loss
    the per-token MEAN (sum / count), with and without the explicit-conflict term, packed or not. Expected values
    come from the brute-force per-token loop on each text alone."""
    tok, model = causal_lm(tiny)
    pad = tok.pad_token_id
    enc = common.encode_pairs(tok, LENGTH_PAIRS, 128)
    n = {k: torch.tensor([float(len(p[j][0]) - p[j][1]) for p in enc]) for j, k in enumerate("cr")}
    assert (n["c"] - n["r"]).abs().max() >= 10  # the lengths differ, so sum and mean tell apart
    s = {k: torch.tensor([sum(token_logps_alone(model, p[j][0])[p[j][1]:]) for p in enc]) for j, k in enumerate("cr")}
    ref = {"c": s["c"] + torch.tensor([3.0, -2.0, 0.5]), "r": s["r"] + torch.tensor([-1.0, 4.0, 0.0])}
    gt_agree = torch.tensor([True, False, True])
    examples = [{"chosen": c, "rejected": r, "ref_chosen": ref["c"][i].item(), "ref_rejected": ref["r"][i].item(),
                 "gt_agree": bool(gt_agree[i])} for i, (c, r) in enumerate(enc)]
    mean = {k: s[k] / n[k] for k in "cr"}
    for alpha, pack in [(0.0, True), (0.5, True), (0.5, False)]:
        with torch.no_grad():
            dpo_args, simpo_args = dpo_w2s.Args(beta=0.1, pack=pack), simpo_w2s.Args(beta=2.0, gamma=1.0, pack=pack)
            dpo, dpo_metrics = dpo_w2s.preference_loss(model, examples, pad, dpo_args, alpha)
            simpo, simpo_metrics = simpo_w2s.preference_loss(model, examples, pad, simpo_args, alpha)

        def dpo_expected(c, r, ref_c, ref_r):
            return (dpo_w2s.dpo_loss(c, r, ref_c, ref_r, 0.1)[0]
                    + alpha * dpo_w2s.dpo_conflict_loss(c, r, ref_c, ref_r, gt_agree, 0.1)).sum().item()

        def simpo_expected(c, r):
            return (simpo_w2s.simpo_loss(c, r, 2.0, 1.0)[0]
                    + alpha * simpo_w2s.simpo_conflict_loss(c, r, gt_agree, 2.0, 1.0)).sum().item()
        assert dpo.item() == pytest.approx(dpo_expected(s["c"], s["r"], ref["c"], ref["r"]), abs=1e-4)
        assert simpo.item() == pytest.approx(simpo_expected(mean["c"], mean["r"]), abs=1e-4)
        # and the other reduction gives something else on these pairs
        assert dpo.item() != pytest.approx(dpo_expected(mean["c"], mean["r"], ref["c"] / n["c"], ref["r"] / n["r"]),
                                           abs=1e-2)
        assert simpo.item() != pytest.approx(simpo_expected(s["c"], s["r"]), abs=1e-2)
    # the logged log-probs are those the loss saw: sums for DPO, means for SimPO (as SimPO's own trainer logs)
    assert dpo_metrics["logps/chosen"].item() == pytest.approx(s["c"].sum().item(), abs=1e-3)
    assert dpo_metrics["logps/rejected"].item() == pytest.approx(s["r"].sum().item(), abs=1e-3)
    assert simpo_metrics["logps/chosen"].item() == pytest.approx(mean["c"].sum().item(), abs=1e-4)
    assert simpo_metrics["logps/rejected"].item() == pytest.approx(mean["r"].sum().item(), abs=1e-4)
    assert dpo_metrics["rewards/chosen"].item() == pytest.approx(0.1 * (s["c"] - ref["c"]).sum().item(), abs=1e-4)


# ---- the explicit-conflict terms of DPO and SimPO

def assert_descent_prefers_gt_rejected(conflict, pi_c, pi_r, gt_agree, conflicts):
    """`conflict(pi_c, pi_r, gt_agree) -> (B,)` on weak-oriented log-probs. Where the policy agrees with the ground
    truth (`conflicts` False): zero gradient. Where it prefers the ground-truth rejected response: the gradient
    lowers the GT-chosen and raises the GT-rejected log-prob, so one gradient-descent step widens
    log π(GT-rejected) - log π(GT-chosen)."""
    pc = torch.tensor(pi_c, dtype=torch.float64, requires_grad=True)
    pr = torch.tensor(pi_r, dtype=torch.float64, requires_grad=True)
    agree = torch.tensor(gt_agree)
    conflict(pc, pr, agree).sum().backward()

    def gap(c, r):  # log π(GT-rejected) - log π(GT-chosen), per pair
        return torch.where(agree, r - c, c - r)
    with torch.no_grad():
        before, after = gap(pc, pr), gap(pc - 0.1 * pc.grad, pr - 0.1 * pr.grad)
    for i, (a, bad) in enumerate(zip(gt_agree, conflicts)):
        g_gt_chosen, g_gt_rejected = (pc.grad[i], pr.grad[i]) if a else (pr.grad[i], pc.grad[i])
        if bad:
            assert g_gt_rejected < 0 < g_gt_chosen, f"pair {i}: gradient {pc.grad[i]}, {pr.grad[i]}"
            assert after[i] > before[i], f"pair {i}: a descent step does not widen the preference for GT-rejected"
        else:
            assert g_gt_rejected == g_gt_chosen == 0, f"pair {i}: the policy agrees with GT, yet has a gradient"
            assert after[i] == before[i]


# weak-oriented log-probs (c = the weak-chosen response) for the conflict terms:
#   pair:      0      1      2     3      4      5      6
# gt_agree:    T      F      T     F      T      F      T
# policy:    c>r    r>c    c<r   c>r    tie    tie    c>r
# agrees GT: yes    yes    no    no     no     no     yes
CONFLICT_AGREE = [True, False, True, False, True, False, True]


CONFLICT_ROWS = [False, False, True, True, True, True, False]


def test_dpo_conflict_loss():
    pi_c = [-10.0, -14.0, -12.0, -10.0, -5.0, -8.0, -1.0]
    pi_r = [-12.0, -11.0, -10.0, -12.0, -5.0, -8.0, -30.0]
    ref_c = torch.tensor([-11.0, -12.0, -11.0, -11.0, -4.0, -7.0, -2.0], dtype=torch.float64)
    ref_r = torch.tensor([-11.0, -12.0, -11.0, -10.0, -6.0, -9.0, -3.0], dtype=torch.float64)
    beta = 0.1
    got = dpo_w2s.dpo_conflict_loss(torch.tensor(pi_c, dtype=torch.float64), torch.tensor(pi_r, dtype=torch.float64),
                                    ref_c, ref_r, torch.tensor(CONFLICT_AGREE), beta)
    # DPO's loss written towards the GT-rejected response y_l' (x = GT-rejected, y = GT-chosen):
    # -log sigmoid(beta * ((pi_x - pi_y) - (ref_x - ref_y)))
    #  2: x = r, y = c: (-10 + 12) - (-11 + 11) = 2         -> log(1 + e^-0.2) = 0.598139
    #  3: x = c, y = r: (-10 + 12) - (-11 + 10) = 3         -> log(1 + e^-0.3) = 0.554355
    #  4: x = r, y = c: (0) - (-6 + 4) = 2                  -> 0.598139
    #  5: x = c, y = r: (0) - (-7 + 9) = -2                 -> log(1 + e^0.2) = 0.798139
    expected = [0.0, 0.0, math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(-0.3)), math.log(1 + math.exp(-0.2)),
                math.log(1 + math.exp(0.2)), 0.0]
    assert expected[2:6] == pytest.approx([0.598139, 0.554355, 0.598139, 0.798139], abs=1e-6)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert_descent_prefers_gt_rejected(lambda c, r, a: dpo_w2s.dpo_conflict_loss(c, r, ref_c, ref_r, a, beta),
                                       pi_c, pi_r, CONFLICT_AGREE, CONFLICT_ROWS)


def test_simpo_conflict_loss():
    pi_c = [-1.0, -2.0, -2.0, -1.0, -0.5, -1.0, -0.2]
    pi_r = [-2.0, -1.0, -1.5, -2.0, -0.5, -1.0, -3.0]
    beta, gamma = 2.0, 1.0
    got = simpo_w2s.simpo_conflict_loss(torch.tensor(pi_c), torch.tensor(pi_r), torch.tensor(CONFLICT_AGREE),
                                        beta, gamma)
    # SimPO's loss towards the GT-rejected response x over the GT-chosen y: -log sigmoid(beta * (pi_x - pi_y) - gamma)
    #  2: x = r: 2 * (-1.5 + 2) - 1 = 0   -> log 2 = 0.693147
    #  3: x = c: 2 * (-1 + 2) - 1 = 1     -> log(1 + e^-1) = 0.313262
    #  4, 5: ties: 2 * 0 - 1 = -1         -> log(1 + e) = 1.313262
    expected = [0.0, 0.0, math.log(2), math.log(1 + math.exp(-1)), math.log(1 + math.e), math.log(1 + math.e), 0.0]
    assert expected[2:6] == pytest.approx([0.693147, 0.313262, 1.313262, 1.313262], abs=1e-6)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert_descent_prefers_gt_rejected(lambda c, r, a: simpo_w2s.simpo_conflict_loss(c, r, a, beta, gamma),
                                       pi_c, pi_r, CONFLICT_AGREE, CONFLICT_ROWS)
