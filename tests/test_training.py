"""The training loops of rm_w2s, dpo_w2s and simpo_w2s: gradient accumulation that does not depend on the
micro-batch size, the optimizer step, DPO's first loss, the paper's defaults (options, learning-rate schedules,
the reward head's zero start) and mixed precision (rewards and logits in fp32 under bf16 autocast).
"""
import contextlib
import dataclasses
import copy
import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import common
import dpo_w2s
import rm_w2s
import simpo_w2s
from conftest import CORPUS, CPU, causal_lm, encoded_examples, reward_model, rewards_of


# ---- gradient accumulation: normalised by the units of the whole optimizer step

def step_grads(model, examples, micro_batches, pad_id, alpha=0.0, per_micro_mean=False):
    """Gradients of one optimizer step accumulated over `micro_batches`, computed here as rm_w2s.preference_loss
    and rm_w2s.train's inner loop compute them.
    per_micro_mean: the common bug (loss.mean() / number of micro-batches), as a negative control."""
    model.zero_grad(set_to_none=True)
    n_pairs = sum(len(mb) for mb in micro_batches)
    for mb in micro_batches:
        batch = [examples[i] for i in mb]
        rewards = rewards_of(model, [s for e in batch for s in (e["chosen"], e["rejected"])], pad_id, pack=True)
        r_c, r_r = rewards[0::2], rewards[1::2]
        losses = rm_w2s.soft_label_loss(r_c, r_r, torch.tensor([e["target"] for e in batch]))
        if alpha:
            y_gt = torch.ones(len(batch))  # the pairs are in ground-truth orientation
            shown_first = torch.tensor([e["chosen_first"] for e in batch])
            losses = losses + alpha * rm_w2s.explicit_conflict_loss(r_c, r_r, y_gt, shown_first)
        (losses.mean() / len(micro_batches) if per_micro_mean else losses.sum() / n_pairs).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_gradient_accumulation_uneven_micro_batches(tiny, alpha):
    """Gradient accumulation divides by the pairs of the whole step, not per micro-batch: one batch of 8 ==
    micro-batches 4+4 == 3+5 == 7+1 when normalised by the step's 8 pairs."""
    tok, model = reward_model(tiny)
    examples = encoded_examples(tok, 8)
    full = step_grads(model, examples, [list(range(8))], tok.pad_token_id, alpha)
    for split in ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1, 2], [3, 4, 5, 6, 7]], [[0, 1, 2, 3, 4, 5, 6], [7]]):
        assert_grads_close(step_grads(model, examples, split, tok.pad_token_id, alpha), full)
    # the test bites: a per-micro-batch mean weighs 3+5 wrongly
    wrong = step_grads(model, examples, [[0, 1, 2], [3, 4, 5, 6, 7]], tok.pad_token_id, alpha, per_micro_mean=True)
    assert any(not torch.allclose(wrong[k], full[k], atol=1e-6, rtol=1e-5) for k in full)


# ---- rm_w2s.train

class RecordingOptimizer(torch.optim.SGD):
    """Stands in for AdamW inside a script's train(): records each step's gradients and leaves the weights alone."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, lr=0.0)
        self.grads = []

    @torch.no_grad()
    def step(self, closure=None):
        self.grads.append({id(p): p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None})


def run_train(model, examples, pad_id, stage_dir, alpha=0.0, **overrides):
    args = rm_w2s.Args(**{"batch_size": 8, "micro_batch": 8, "lr": 1e-3, "epochs": 1, "warmup_ratio": 0.0,
                          "grad_clip": 1e9, "group_by_length": False, "seed": 0, "log_every": 1000,
                          "precision": "fp32", **overrides})
    stage_dir.mkdir(parents=True, exist_ok=True)
    rm_w2s.train(model, examples, pad_id=pad_id, alpha=alpha, args=args, log_dir=stage_dir)
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_accumulates_gradients_independently_of_micro_batch(tiny, tmp_path, monkeypatch):
    """rm_w2s.train itself: the gradient each optimizer step sees (before clipping; clip is 1e9 here) is the
    same for micro_batch 8, 4, 2 and 1 (the short last step splits 6, 4+2, 2+2+2, 1 x 6), and equals the
    full-batch gradient of the step's mean loss."""
    tok, base = reward_model(tiny)
    examples = encoded_examples(tok, 14)  # steps of 8 and 6 pairs: micro-batches 4+2 in the second
    recorded = {}
    for micro in (8, 4, 2, 1):
        model = copy.deepcopy(base)
        opt = {}
        monkeypatch.setattr(common, "make_optimizer", lambda params, *a: opt.setdefault("o", RecordingOptimizer(params)))
        rows = run_train(model, examples, tok.pad_token_id, tmp_path / f"m{micro}", alpha=0.5, micro_batch=micro)
        assert [r["examples_seen"] for r in rows] == [8, 14]
        names = {id(p): n for n, p in model.named_parameters()}
        recorded[micro] = [{names[k]: g for k, g in step.items()} for step in opt["o"].grads]
    assert len(recorded[8]) == 2
    for micro in (4, 2, 1):
        for a, b in zip(recorded[micro], recorded[8]):
            assert_grads_close(a, b)
    # and it is the plain full-batch gradient of the step (same order: make_batches without grouping)
    steps = common.make_batches([0] * 14, 8, 8, seed=0, group_by_length=False)
    for step, got in zip(steps, recorded[8]):
        assert_grads_close(got, step_grads(copy.deepcopy(base), examples, step, tok.pad_token_id, alpha=0.5))


def test_train_one_adamw_step_same_params_for_micro_batch_8_and_4(tiny, tmp_path):
    """AdamW's first step is ~lr * sign(grad), blind to a uniform scale error (the gradient test above catches
    those); this checks the whole train() path end to end: same weights after one step."""
    tok, base = reward_model(tiny)
    examples = encoded_examples(tok, 8)
    models = {}
    for micro in (8, 4):
        models[micro] = copy.deepcopy(base)
        rows = run_train(models[micro], examples, tok.pad_token_id, tmp_path / f"m{micro}", grad_clip=1.0,
                         micro_batch=micro, lr=1e-3)
        assert len(rows) == 1 and rows[0]["examples_seen"] == 8
    # Where the true gradient is 0 Adam's first step is lr * noise / (|noise| + eps): arbitrary. That is the case
    # for the head bias and ln_f.bias (a constant shift of every reward cancels in r_c - r_r, so their gradient
    # is only rounding noise), so compare where the step's gradient is clearly non-zero.
    grads = step_grads(copy.deepcopy(base), examples, [list(range(8))], tok.pad_token_id)
    moved, compared = 0.0, 0
    for (name, a), b, p0 in zip(models[8].named_parameters(), models[4].parameters(), base.parameters()):
        real = grads[name].abs() > 1e-5
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
        moved, compared = max(moved, (a - p0).abs().max().item()), compared + int(real.sum())
    assert compared > 2000  # (unused token / position embeddings have no gradient either)
    assert moved > 1e-4  # the step did move the weights, so the comparison is not vacuous


@pytest.mark.parametrize("head_lr", [0.0, 1e-2])
def test_head_lr_gives_the_head_its_own_rate(tiny, tmp_path, head_lr):
    """--head_lr: AdamW's first step moves a weight by its group's rate where the gradient is clearly non-zero
    (m / sqrt(v) = sign(g) after bias correction): the head by head_lr, the body by lr; 0 keeps one rate."""
    tok, base = reward_model(tiny)
    examples = encoded_examples(tok, 8)
    grads = step_grads(copy.deepcopy(base), examples, [list(range(8))], tok.pad_token_id)
    model = copy.deepcopy(base)
    run_train(model, examples, tok.pad_token_id, tmp_path, lr=1e-4, head_lr=head_lr, schedule="constant")
    moves = {}
    for (name, p), p0 in zip(model.named_parameters(), base.parameters()):
        real = grads[name].abs() > 1e-4  # Adam's eps (1e-8) shifts a step by eps / |g|
        moves.setdefault("head" if name.startswith("head.") else "body", []).append((p - p0)[real].abs())
    head, body = (torch.cat(moves[k]) for k in ("head", "body"))
    assert head.numel() > 0.9 * base.head.weight.numel() and body.numel() > 2000
    # within fp32 rounding of p + step (an ulp of a weight near 1 is 1.2e-7, 0.1% of a step of 1e-4)
    torch.testing.assert_close(head, torch.full_like(head, head_lr or 1e-4), rtol=2e-3, atol=0)
    torch.testing.assert_close(body, torch.full_like(body, 1e-4), rtol=2e-3, atol=0)


# ---- dpo_w2s.train and simpo_w2s.train

def po_examples(tok, model, n, seed=0):
    """n encoded pairs as dpo_w2s.train / simpo_w2s.train expect, with DPO's reference log-probs computed by the
    model itself (so policy == reference) and a mix of gt_agree."""
    rng = random.Random(seed)
    texts = list(dict.fromkeys(CORPUS))
    enc = common.encode_pairs(tok, [dict(zip(("chosen", "rejected"), rng.sample(texts, 2))) for _ in range(n)], 128)
    ref = common.pair_logps(model, enc, tok.pad_token_id, 4, contextlib.nullcontext)
    return [{"chosen": c, "rejected": r, "ref_chosen": rc.sum, "ref_rejected": rr.sum, "gt_agree": rng.random() < 0.5}
            for (c, r), (rc, rr) in zip(enc, ref)]


def po_objective(module, objective, model, pad_id, alpha):
    """(batch_loss, units) as train() computes them: the method's loss (1 unit per pair) or SFT's (1 unit per
    response token)."""
    if objective == "sft":
        return (lambda batch: common.sft_loss(model, batch, pad_id)), common.response_tokens
    args = dpo_w2s.Args(beta=0.1, pack=True) if module is dpo_w2s else simpo_w2s.Args(beta=2.0, gamma=1.0, pack=True)
    return (lambda batch: module.preference_loss(model, batch, pad_id, args, alpha)), (lambda example: 1)


def run_po_train(module, objective, model, examples, pad_id, log_path, alpha, **overrides):
    """module.train for one epoch with a RecordingOptimizer (install it first); returns the metrics rows."""
    args = module.Args(**{"batch_size": 8, "micro_batch": 8, "epochs": 1, "sft_epochs": 1, "lr": 1e-3,
                          "warmup_ratio": 0.0, "grad_clip": 1e9, "seed": 0, "log_every": 1000, "precision": "fp32",
                          **overrides})
    sft = objective == "sft"
    if sft:
        examples = [{"chosen": e["chosen"]} for e in examples]
    log_dir = log_path.parent / log_path.stem
    log_dir.mkdir(parents=True, exist_ok=True)
    module.train(model, examples, sft=sft, pad_id=pad_id, alpha=alpha, args=args, log_dir=log_dir)
    written = log_dir / ("sft_metrics.jsonl" if sft else "metrics.jsonl")
    return [json.loads(line) for line in written.read_text().splitlines()]


@pytest.mark.parametrize("objective", ["po", "sft"])
@pytest.mark.parametrize("module", [dpo_w2s, simpo_w2s], ids=["dpo", "simpo"])
def test_po_train_accumulates_gradients_independently_of_micro_batch(tiny, tmp_path, monkeypatch, module, objective):
    """Gradient accumulation divides by the units of the whole step, for dpo_w2s.train / simpo_w2s.train: each optimizer step's gradient (before clipping; clip 1e9)
    is the same for micro_batch 8, 4 and 2 (the short last step of 6 pairs splits 6, 4+2, 2+2+2) and equals the
    gradient of the whole step's summed loss divided by its units: pairs for DPO/SimPO (explicit term on), response
    tokens for SFT. Grouped by length, as by default."""
    tok, base = causal_lm(tiny)
    pad = tok.pad_token_id
    examples = po_examples(tok, base, 14)
    recorded = {}
    for micro in (8, 4, 2):
        model = copy.deepcopy(base)
        opt = {}
        monkeypatch.setattr(common, "make_optimizer",
                            lambda params, *a: opt.setdefault("o", RecordingOptimizer(params)))
        rows = run_po_train(module, objective, model, examples, pad, tmp_path / f"m{micro}.jsonl", 0.5,
                            micro_batch=micro)
        assert [r["examples_seen"] for r in rows] == [8, 14]
        names = {id(p): n for n, p in model.named_parameters()}
        recorded[micro] = [{names[k]: g for k, g in step.items()} for step in opt["o"].grads]
    assert len(recorded[8]) == 2
    for micro in (4, 2):
        for a, b in zip(recorded[micro], recorded[8]):
            assert_grads_close(a, b)
    if objective == "sft":  # SFT examples hold the chosen text only
        examples = [{"chosen": e["chosen"]} for e in examples]
    lengths = [max(common.row_lengths(common.example_texts(e), True)) for e in examples]  # as train() groups them
    for step, got in zip(common.make_batches(lengths, 8, 8, seed=0), recorded[8]):
        model = copy.deepcopy(base)
        batch_loss, size = po_objective(module, objective, model, pad, 0.5)
        batch = [examples[i] for mb in step for i in mb]
        loss, _ = batch_loss(batch)
        (loss / sum(size(e) for e in batch)).backward()
        assert_grads_close(got, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def test_dpo_train_starts_at_log2(tiny, tmp_path, monkeypatch):
    """The DPO loss starts at log 2, through dpo_w2s.train: with the reference log-probs computed by common.pair_logps from the
    policy itself (as dpo_w2s.train_preferences does after SFT) and the weights held still, every step's loss is log 2 and the
    rewards are 0; the reference path (pair_logps) and the training forward agree."""
    tok, model = causal_lm(tiny)
    examples = po_examples(tok, model, 14)
    monkeypatch.setattr(common, "make_optimizer", lambda params, *a: RecordingOptimizer(params))
    rows = run_po_train(dpo_w2s, "po", model, examples, tok.pad_token_id, tmp_path / "metrics.jsonl", 0.0,
                        micro_batch=4)
    assert len(rows) == 2
    for row in rows:
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-5)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert row[key] == pytest.approx(0.0, abs=1e-5)
        assert {"rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm", "lr"} <= row.keys()


# ---- the paper's defaults: options, schedules, the reward head's zero start

def test_defaults_are_the_papers():
    """Each default is the paper's code (keven980716/weak-to-strong-deception: run_*.sh, train*.py)."""
    rm, dpo, simpo = rm_w2s.Args(), dpo_w2s.Args(), simpo_w2s.Args()
    assert (rm.lr, rm.batch_size, rm.epochs, rm.warmup_ratio, rm.grad_clip, rm.weight_decay, rm.max_len) \
        == (1e-5, 32, 1, 0.0, 0.0, 0.0, 512)  # Adam, cosine annealing from the first step, no clipping
    assert (rm.conf_scale, rm.alpha, rm.hard_labels) == (1.0, 0.5, False)  # soft labels p = sigmoid(margin)
    assert rm.head_lr == 0.0  # 0 = the head at --lr: one rate for body and head, as the paper's code
    assert (dpo.lr, dpo.epochs, dpo.sft_epochs, dpo.beta, dpo.warmup_ratio, dpo.grad_clip, dpo.conf_scale) \
        == (1e-6, 3, 1, 0.1, 0.1, 0.0, 50.0)  # confidence sigmoid(margin_sum / 50)
    assert (simpo.lr, simpo.epochs, simpo.sft_epochs, simpo.beta, simpo.gamma, simpo.warmup_ratio, simpo.grad_clip,
            simpo.conf_scale) == (1e-6, 1, 1, 2.0, 1.0, 0.1, 0.0, 1.0)
    assert dpo.sft_lr == simpo.sft_lr == 0.0  # 0 = the preference stage's lr, as the paper's scripts pass it


def test_lr_at_is_the_papers_schedule():
    """Warm-up then constant: the paper's LambdaLR min(1, (step + 1) / (int(n * ratio) + 1)); cosine with no
    warm-up: torch's CosineAnnealingLR(T_max = n) from the first step."""
    n, lr = 40, 1e-3
    for ratio in (0.0, 0.1, 0.25):
        paper = [lr * min(1.0, (step + 1) / (int(n * ratio) + 1)) for step in range(n)]
        assert [common.lr_at(step, n, lr, ratio, "constant") for step in range(n)] == pytest.approx(paper)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n)
    cosine = []
    for _ in range(n):
        cosine.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [common.lr_at(step, n, lr, 0.0, "cosine") for step in range(n)] == pytest.approx(cosine)


def test_reward_head_starts_at_zero_without_bias(tiny):
    from transformers import AutoModel
    tok = common.load_tokenizer(tiny)
    model = rm_w2s.RewardModel(common.load_model(tiny, AutoModel, tok, CPU))
    assert model.head.bias is None and not model.head.weight.any()
    seqs = [s for pair in common.encode_pairs(tok, [{"chosen": CORPUS[0], "rejected": CORPUS[1]}], 64) for s in pair]
    assert rewards_of(model, seqs, tok.pad_token_id).tolist() == [0.0, 0.0]  # first margins 0, first labels 0.5


# ---- mixed precision: heads and logits in fp32 under bf16 autocast

def test_reward_is_fp32_under_bf16_autocast(tiny):
    """Under bf16 autocast the head still computes in fp32: bf16 would round a reward of ~5 to steps of 1/32."""
    tok, model = reward_model(tiny)
    with torch.no_grad():
        model.head.weight.mul_(50)  # rewards of several units, where bf16's steps are coarse
        seqs = [s for pair in common.encode_pairs(tok, [{"chosen": t, "rejected": t + " Yes"} for t in CORPUS[:6]], 64)
                for s in pair]
        inputs, _, rows, last = common.collate(seqs, tok.pad_token_id, CPU)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rewards = model(inputs, rows, last)
            hidden = model.body(**inputs).last_hidden_state[rows, last]
        assert rewards.dtype == torch.float32 and rewards.abs().max() > 2
        torch.testing.assert_close(rewards, (hidden.float() @ model.head.weight.T).squeeze(-1), rtol=1e-6, atol=1e-6)
        assert not torch.equal(rewards, rewards.bfloat16().float())  # not bf16 values in disguise


@pytest.mark.parametrize("arch", ["tiny", "tiny_llama", "tiny_opt", "tiny_neox"])
def test_lm_logits_equal_the_models_own_in_fp32(arch, request):
    path = request.getfixturevalue(arch)
    tok = common.load_tokenizer(path)
    model = common.load_model(path, AutoModelForCausalLM, tok, CPU)
    inputs, _, _, _ = common.collate(common.encode_texts(tok, CORPUS[:4], 64), tok.pad_token_id, CPU)
    with torch.no_grad():
        torch.testing.assert_close(common.lm_logits(model, inputs), model(**inputs).logits, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert common.lm_logits(model, inputs).dtype == torch.float32



@pytest.mark.parametrize("arch", ["tiny", "tiny_llama", "tiny_opt", "tiny_neox"])
@pytest.mark.parametrize("pack", [False, True])
def test_response_logps_equal_the_full_logits(arch, pack, request):
    """The output projection at response positions only (common.response_logps) gives the log-probs and their
    gradients that every position's logits give, packed or not, in fp32 and under bf16 autocast."""
    path = request.getfixturevalue(arch)
    tok = common.load_tokenizer(path)
    model = common.load_model(path, AutoModelForCausalLM, tok, CPU, pack=pack)
    texts = common.encode_texts(tok, CORPUS[:4], 64)
    batch = common.collate(texts, tok.pad_token_id, CPU, pack)
    for precision in ("fp32", "bf16"):
        grads = []
        for logps in (lambda: common.response_logps(model, batch),
                      lambda: common.sequence_logps(common.lm_logits(model, batch.inputs), batch.inputs["input_ids"],
                                                    batch.response_mask, batch.rows)):
            model.zero_grad()
            with common.autocast(precision)():
                out = logps()
            out.sum.sum().backward()
            grads.append((out.sum.detach(), out.n_tokens, [p.grad.clone() for p in model.parameters()]))
        (fast, n_fast, g_fast), (full, n_full, g_full) = grads
        assert n_fast.tolist() == n_full.tolist() and min(n_fast.tolist()) > 0
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-4)
        for a, b in zip(g_fast, g_full):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_response_logps_apply_the_models_soft_capping(tiny_llama):
    """A model whose forward caps its logits (Gemma 2: final_logit_softcapping) gets the same cap at the response
    positions; a model whose forward does something else after the projection is refused at load."""
    tok = common.load_tokenizer(tiny_llama)
    model = common.load_model(tiny_llama, AutoModelForCausalLM, tok, CPU)
    batch = common.collate(common.encode_texts(tok, CORPUS[:2], 64), tok.pad_token_id, CPU)
    with torch.no_grad():
        plain = common.response_logps(model, batch).sum
        model.config.final_logit_softcapping = 0.5  # a cap this small changes every log-prob
        capped = common.response_logps(model, batch).sum
        logits = torch.tanh(common.lm_logits(model, batch.inputs) / 0.5) * 0.5
        full = common.sequence_logps(logits, batch.inputs["input_ids"], batch.response_mask).sum
    torch.testing.assert_close(capped, full)
    assert (capped - plain).abs().min() > 1e-3
    # LlamaForCausalLM applies no cap of its own, so the probe now sees a difference and refuses the model
    with pytest.raises(SystemExit, match="does not reproduce"):
        common.check_response_logits(model, tok.pad_token_id)



def test_compile_auto_compiles_only_big_bodies_in_bf16_on_a_cpu():
    """--compile auto: on for bf16 on a CPU and a body of at least COMPILE_MIN_PARAMS parameters (measured to pay,
    docs/speed.md); off for tiny models (a compile outlasts their training), in fp32 and on a GPU (not measured)."""
    big, small = torch.nn.Linear(common.COMPILE_MIN_PARAMS, 1, bias=False), torch.nn.Linear(10, 1)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert common.use_compile("auto", "bf16", big, cpu)
    assert not common.use_compile("auto", "bf16", small, cpu)
    assert not common.use_compile("auto", "fp32", big, cpu)
    assert not common.use_compile("auto", "bf16", big, gpu)
    assert common.use_compile("on", "fp32", small, cpu) and not common.use_compile("off", "bf16", big, cpu)


def test_compiled_body_trains_as_the_eager_one(tiny):
    """--compile on gives the eager model's rewards and gradients (fp32: to float rounding), through the packed
    mask and at two lengths (dynamic shapes), and the state dict keeps its keys (no _orig_mod prefix)."""
    tok = common.load_tokenizer(tiny)
    args = rm_w2s.Args(precision="fp32")
    eager, _ = rm_w2s.load(tiny, dataclasses.replace(args, compile="off"), CPU)
    compiled, _ = rm_w2s.load(tiny, dataclasses.replace(args, compile="on"), CPU)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    for model in (eager, compiled):
        torch.nn.init.normal_(model.head.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    for n in (4, 6):
        pairs = [{"chosen": CORPUS[i], "rejected": CORPUS[i + 1]} for i in range(n)]
        texts = [t for pair in rm_w2s.encode(tok, pairs, 64) for t in pair]
        batch = common.collate(texts, tok.pad_token_id, CPU, pack=True)
        out = []
        for model in (eager, compiled):
            model.zero_grad()
            rewards = model(batch.inputs, batch.rows, batch.last)
            rewards.square().sum().backward()
            out.append((rewards.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-5)
        for a, b in zip(out[1][1], out[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # fp32, summed in another order


# ---- --precision: bf16 autocast where the chip computes it natively, fp32 heads; the same science

def test_auto_precision_is_bf16_only_where_bf16_is_native(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert common.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # torch would emulate it
    assert common.resolve_precision("auto") == "fp32"
    assert [common.resolve_precision(p) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    assert common.autocast("fp32") is contextlib.nullcontext
    with common.autocast("bf16")():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError):
        common.autocast("fp16")


@pytest.mark.parametrize("arch", ["tiny", "tiny_llama"])
@pytest.mark.parametrize("bf16_attention_from", [common.BF16_ATTENTION_MIN_LEN, 0])
def test_bf16_margins_and_logps_are_fp32_within_bf16_rounding(arch, bf16_attention_from, request, monkeypatch):
    """One forward in bf16 autocast gives the reward model's margins and the policy's summed and mean response
    log-probs of fp32 to within bf16's rounding (relative error of the order of 1e-2), with fp32 heads; the
    numbers are not fp32's own (bf16 really ran), and packed pairs still give each text what it gets alone.
    Attention runs in fp32 on these short rows, and in bf16 on every row when the threshold is 0 (as on rows
    of BF16_ATTENTION_MIN_LEN tokens and more)."""
    from transformers import AutoModel
    from transformers.integrations import sdpa_attention
    monkeypatch.setattr(common, "BF16_ATTENTION_MIN_LEN", bf16_attention_from)
    # the dtype attention computes in on the bf16 models' forwards under autocast (not their load-time probes):
    # autocast casts sdpa's inputs to bf16 (Llama's rotary hands it fp32 q, k); sdpa_cpu_bf16 turns it off for fp32
    attention_dtypes, scoring = set(), [False]
    chooser, kernel = common.sdpa_cpu_bf16, sdpa_attention.sdpa_attention_forward

    def spy_chooser(*args, **kwargs):  # load_model registers the function common names
        scoring[0] = torch.is_autocast_enabled("cpu")
        return chooser(*args, **kwargs)

    def spy_kernel(module, query, *args, **kwargs):
        if scoring[0]:
            attention_dtypes.add(torch.bfloat16 if torch.is_autocast_enabled("cpu") else query.dtype)
        return kernel(module, query, *args, **kwargs)
    monkeypatch.setattr(common, "sdpa_cpu_bf16", spy_chooser)
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy_kernel)
    path = request.getfixturevalue(arch)
    tok = common.load_tokenizer(path)
    pairs = [{"chosen": c, "rejected": r} for c, r in zip(CORPUS[:8], CORPUS[8:16]) if c != r]
    margins = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = rm_w2s.RewardModel(common.load_model(path, AutoModel, tok, CPU, precision=precision))
        torch.nn.init.normal_(model.head.weight, std=model.head.weight.shape[1] ** -0.5)
        if precision == "bf16":
            assert model.body.config._attn_implementation == "sdpa_cpu_bf16"
        encoded = rm_w2s.encode(tok, pairs, 128)
        margins[precision] = torch.tensor(rm_w2s.score_pairs(model, encoded, tok.pad_token_id, 4,
                                                             common.autocast(precision)))
        if precision == "bf16":  # packed pairs under bf16: each text as alone, to bf16 rounding (a leak is ~1)
            texts = [t for pair in encoded for t in pair]
            with torch.no_grad(), common.autocast("bf16")():
                packed = rewards_of(model, texts, tok.pad_token_id, pack=True)
                alone = rewards_of(model, texts, tok.pad_token_id)
            assert float((packed - alone).abs().max()) < 3e-2 * float(alone.abs().max())
    scale = float(margins["fp32"].abs().max())
    assert float((margins["bf16"] - margins["fp32"]).abs().max()) < 3e-2 * scale
    assert not torch.equal(margins["bf16"], margins["fp32"])
    logps = {}
    for precision in ("fp32", "bf16"):
        model = common.load_model(path, AutoModelForCausalLM, tok, CPU, precision=precision)
        logps[precision] = common.pair_logps(model, common.encode_pairs(tok, pairs, 128), tok.pad_token_id, 4,
                                             common.autocast(precision))
    for (c32, r32), (c16, r16) in zip(logps["fp32"], logps["bf16"]):
        for a, b in ((c32, c16), (r32, r16)):
            assert b.sum == pytest.approx(a.sum, rel=2e-2) and b.mean == pytest.approx(a.mean, rel=2e-2)
            assert b.n_tokens == a.n_tokens
    assert attention_dtypes == {torch.bfloat16 if bf16_attention_from == 0 else torch.float32}


def test_adamw_is_fused_and_steps_as_the_default_one():
    """make_optimizer's fused AdamW (one kernel, on the CPU too) takes the step torch's default AdamW takes, to
    float rounding, with weight decay and over several steps."""
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(5)]
    params = {kind: [torch.nn.Parameter(w.clone()) for w in weights] for kind in ("fused", "default")}
    optimizers = {"fused": common.make_optimizer(params["fused"], 1e-2, 0.1),
                  "default": torch.optim.AdamW(params["default"], lr=1e-2, weight_decay=0.1)}
    assert optimizers["fused"].defaults["fused"] and not optimizers["default"].defaults["fused"]
    for step in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for kind, optimizer in optimizers.items():
            for p, g in zip(params[kind], grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b, w in zip(params["fused"], params["default"], weights):
        assert not torch.equal(a, w)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fp32_precision_loads_plain_sdpa(tiny_llama):
    tok = common.load_tokenizer(tiny_llama)
    model = common.load_model(tiny_llama, AutoModelForCausalLM, tok, CPU, precision="fp32")
    assert model.config._attn_implementation == "sdpa"
