"""Fast unit tests of the losses and the shared plumbing (the whole file runs in well under a minute on CPU).

Data: the offline copies in ../shared/data (override with W2S_SHARED_DATA=<dir>). Where that folder does not
exist (a user's clone), the data tests run on small synthetic files written here with known counts, and say so.
Models: tiny random-init GPT-2 / Llama bodies with a BPE tokenizer trained on a few sentences, built locally.
"""
import contextlib
import copy
import dataclasses
import gzip
import json
import math
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import bench
import common
import dpo_w2s
import rm_w2s
import simpo_w2s
import toy

CPU = torch.device("cpu")
SHARED_DATA = Path(os.environ.get("W2S_SHARED_DATA") or Path(__file__).resolve().parent.parent / "shared" / "data")


def data_source(kind):
    """Which data a test reads: the shared offline copy if present, else synthetic; says so (never a silent skip)."""
    path = SHARED_DATA / kind
    if path.exists():
        print(f"[data] {kind}: shared copy {path}")
        return path
    msg = f"{path} not found: {kind} tests run on synthetic data written by the test"
    print(f"[data] {msg}")
    warnings.warn(msg)
    return None


# a small corpus for the tiny tokenizers: HH-style texts, some with "!" (GPT-2's token 0)
CORPUS = [f"\n\nHuman: {q}\n\nAssistant: {a}" for q, a in [
    ("How do I bake bread?", "Mix flour, water and yeast, then bake it!"),
    ("Can you help me steal a car?", "No, I won't help with that!"),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side!"),
    ("How can I hurt someone?", "I can't help with hurting people. Are you safe?"),
    ("What's a good book?", "Try reading a classic novel, like Pride and Prejudice."),
]] * 4


def save_tiny(tmp_path_factory, name, make_model, bos=False):
    """A random-init model from make_model(tok) and a BPE tokenizer trained on CORPUS, saved like a Hub model."""
    path = tmp_path_factory.mktemp(name)
    tok = toy.train_tokenizer(CORPUS, 300, bos=bos)
    torch.manual_seed(0)
    make_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1-layer GPT-2 body saved like a Hub model (no pad token: load_tokenizer makes pad = EOS)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    return save_tiny(tmp_path_factory, "tiny-gpt2", lambda tok: GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tok), n_layer=1, n_embd=32, n_head=1, n_positions=128,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 1-layer Llama body (rotary positions) with a BOS-adding tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return save_tiny(tmp_path_factory, "tiny-llama", lambda tok: LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)), bos=True)


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    """A 1-layer OPT body (learned positions with an offset of 2, a BOS-adding tokenizer): the paper's family."""
    from transformers import OPTConfig, OPTForCausalLM
    return save_tiny(tmp_path_factory, "tiny-opt", lambda tok: OPTForCausalLM(OPTConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
        max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)), bos=True)


@pytest.fixture(scope="module")
def tiny_neox(tmp_path_factory):
    """A 1-layer GPT-NeoX body (Pythia's architecture: partial rotary positions)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return save_tiny(tmp_path_factory, "tiny-neox", lambda tok: GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)))


def rewards_of(model, seqs, pad_id, pack=False):
    """A reward model's rewards of encoded texts in one forward, as rm_w2s.train computes them."""
    inputs, _, rows, last = common.collate(seqs, pad_id, CPU, pack)
    return model(inputs, rows, last)


def reward_model(path, pad_token=None):
    """A reward model over the tiny body at `path`, with a random head: the zero head a run starts from (the
    paper's) gives every text the reward 0, which would make the padding, packing and accumulation checks
    below hold trivially."""
    from transformers import AutoModel
    tok = common.load_tokenizer(path)
    if pad_token is not None:
        tok.pad_token = pad_token
    torch.manual_seed(0)
    model = rm_w2s.RewardModel(common.load_model(path, AutoModel, tok, CPU))
    torch.nn.init.normal_(model.head.weight, std=model.head.weight.shape[1] ** -0.5)
    return tok, model


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
    loss = rm_w2s.explicit_conflict_loss(r_c, r_r, torch.ones(3))  # margins > 0 and y_gt = 1: agreement
    assert loss.tolist() == [0.0, 0.0, 0.0]
    loss.sum().backward()
    assert r_c.grad.tolist() == [0.0, 0.0, 0.0]


def test_explicit_conflict_loss_where_student_contradicts():
    margins = [-2.0, -0.5, 0.0]  # 0.0: a tie predicts "rejected", so it contradicts y_gt = 1 too
    r_c = torch.tensor(margins, requires_grad=True)
    r_r = torch.zeros(3)
    loss = rm_w2s.explicit_conflict_loss(r_c, r_r, torch.ones(3))
    # BCE(sigmoid(m), 0) = -log(1 - sigmoid(m)) = log(1 + e^m) = softplus(m)
    expected = [math.log(1 + math.exp(m)) for m in margins]  # 0.126928, 0.474077, 0.693147
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    loss.sum().backward()
    # d softplus(m) / d r_c = sigmoid(m) > 0: gradient descent lowers r_c, pushing the margin further negative
    assert r_c.grad.tolist() == pytest.approx([1 / (1 + math.exp(-m)) for m in margins], abs=1e-6)
    assert all(g > 0 for g in r_c.grad.tolist())


def test_explicit_conflict_loss_mixed_batch():
    r_c, r_r = torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.zeros(4)
    loss = rm_w2s.explicit_conflict_loss(r_c, r_r, torch.ones(4))
    assert loss.tolist() == pytest.approx([0.0, math.log(1 + math.exp(-1.0)), 0.0, math.log(2.0)], abs=1e-6)


def encoded_examples(tok, n, seed=0):
    """n encoded pairs from CORPUS with soft targets (as rm_w2s.train expects)."""
    rng = random.Random(seed)
    texts = list(dict.fromkeys(CORPUS))
    out = []
    for i in range(n):
        c, r = rng.sample(texts, 2)
        (ec, er), = common.encode_pairs(tok, [{"chosen": c, "rejected": r}], 128)
        out.append({"chosen": ec, "rejected": er, "target": rng.random(), "gt_agree": True})
    return out


def step_grads(model, examples, micro_batches, pad_id, alpha=0.0, per_micro_mean=False):
    """Gradients of one optimizer step accumulated over `micro_batches`, mirroring rm_w2s.train's inner loop.
    per_micro_mean: the common bug (loss.mean() / number of micro-batches), as a negative control."""
    model.zero_grad(set_to_none=True)
    n_pairs = sum(len(mb) for mb in micro_batches)
    for mb in micro_batches:
        batch = [examples[i] for i in mb]
        rewards = rewards_of(model, [s for e in batch for s in (e["chosen"], e["rejected"])], pad_id, pack=True)
        r_c, r_r = rewards[0::2], rewards[1::2]
        losses = rm_w2s.soft_label_loss(r_c, r_r, torch.tensor([e["target"] for e in batch]))
        if alpha:
            y_gt = torch.tensor([float(e["gt_agree"]) for e in batch])
            losses = losses + alpha * rm_w2s.explicit_conflict_loss(r_c, r_r, y_gt)
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


class RecordingOptimizer(torch.optim.SGD):
    """Stands in for AdamW inside rm_w2s.train: records each step's gradients and leaves the weights alone."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, lr=0.0)
        self.grads = []

    @torch.no_grad()
    def step(self, closure=None):
        self.grads.append({id(p): p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None})


def run_train(model, examples, pad_id, stage_dir, alpha=0.0, **overrides):
    args = rm_w2s.Args(**{"batch_size": 8, "micro_batch": 8, "lr": 1e-3, "epochs": 1, "warmup_ratio": 0.0,
                          "grad_clip": 1e9, "group_by_length": False, "seed": 0, "log_every": 1000, **overrides})
    stage_dir.mkdir(parents=True, exist_ok=True)
    rm_w2s.train(model, examples, pad_id=pad_id, args=args, log_path=stage_dir / "metrics.jsonl",
                 autocast=contextlib.nullcontext, alpha=alpha, desc=stage_dir.name)
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


@pytest.mark.parametrize("pad", ["eos", "!"])
def test_reward_padding_invariance(tiny, pad):
    """Masks come from lengths, never from token values (GPT-2's token 0 is "!"): a text with "!" scores the same alone and right-padded next to a much longer text, with
    pad = EOS (load_tokenizer's default: every encoded text ends in a real EOS) and with pad = "!" (GPT-2's 0)."""
    tok, model = reward_model(tiny, pad_token=None if pad == "eos" else "!")
    assert tok.pad_token_id == (tok.eos_token_id if pad == "eos" else tok.convert_tokens_to_ids("!"))
    short = "\n\nHuman: Hi!\n\nAssistant: No!"
    long = "\n\nHuman: " + "Tell me a joke, please! " * 6 + "\n\nAssistant: " + "Why did the chicken cross the road? " * 3
    (s, _), (l, _) = common.encode_texts(tok, [short, long], 128)
    assert tok.pad_token_id in s and len(l) > 2 * len(s)
    model.eval()
    with torch.no_grad():
        alone = rewards_of(model, [(s, 1)], tok.pad_token_id)
        inputs, _, rows, last = common.collate([(l, 1), (s, 1)], tok.pad_token_id, CPU)
        batched = model(inputs, rows, last)
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
    # the test bites: reading lengths from token values would pick another position for the short text
    assert int((ids[1] != tok.pad_token_id).sum()) != int(attn[1].sum())
    assert batched[1].item() == pytest.approx(alone[0].item(), abs=1e-5)
    # and the reward is read at the last real token (the EOS), not one off
    with torch.no_grad():
        hidden = model.body(input_ids=torch.tensor([s])).last_hidden_state  # (1, T, H)
        assert alone[0].item() == pytest.approx(model.head(hidden[0, -1]).item(), abs=1e-5)
        assert alone[0].item() != pytest.approx(model.head(hidden[0, -2]).item(), abs=1e-5)


def test_reward_padding_invariance_llama(tiny_llama):
    tok, model = reward_model(tiny_llama)
    short = "\n\nHuman: Hi!\n\nAssistant: No!"
    long = "\n\nHuman: " + "Tell me a joke! " * 8 + "\n\nAssistant: " + "Paris is the capital of France. " * 3
    (s, _), (l, _) = common.encode_texts(tok, [short, long], 128)
    model.eval()
    with torch.no_grad():
        alone = rewards_of(model, [(s, 1)], tok.pad_token_id)
        batched = rewards_of(model, [(l, 1), (s, 1)], tok.pad_token_id)
    assert batched[1].item() == pytest.approx(alone[0].item(), abs=1e-5)


# ---- common

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
    assert ks["areas"]["weak-unknown & strong-known"] == {"n": 0, "student_error": None}
    assert ks["areas"]["weak-unknown & strong-unknown"] == {"n": 0, "student_error": None}
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


def test_encode_texts_splits_at_last_assistant(tiny):
    tok = common.load_tokenizer(tiny)
    prompt = "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: Bake bread?\n\nAssistant:"
    text = prompt + " Mix flour and water!"
    assert common.split_prompt(text) == (prompt, " Mix flour and water!")
    [(ids, n_prompt)] = common.encode_texts(tok, [text], 128)
    assert ids[:n_prompt] == tok(prompt)["input_ids"]
    assert ids[n_prompt:] == tok(" Mix flour and water!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids[n_prompt:-1]) == " Mix flour and water!"
    with pytest.raises(ValueError):
        common.split_prompt("\n\nHuman: no assistant turn")


def test_encode_texts_truncation(tiny):
    tok = common.load_tokenizer(tiny)
    prompt = "\n\nHuman: " + "Tell me a joke please. " * 5 + "\n\nAssistant:"
    resp = " Paris is the capital of France."
    p = tok(prompt)["input_ids"]
    r = tok(resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(p) > 10 and len(r) > 4
    # fits exactly: untouched
    [(ids, n)] = common.encode_texts(tok, [prompt + resp], len(p) + len(r))
    assert (ids, n) == (p + r, len(p))
    # too long by 5: the prompt loses its 5 leftmost tokens, the response is whole (with its EOS)
    [(ids, n)] = common.encode_texts(tok, [prompt + resp], len(p) + len(r) - 5)
    assert ids == p[5:] + r and n == len(p) - 5
    # the response alone is too long: one prompt token (the last) and the response's first max_len - 1 tokens
    [(ids, n)] = common.encode_texts(tok, [prompt + resp], 4)
    assert ids == p[-1:] + r[:3] and n == 1
    # every length keeps >= 1 prompt token and >= 1 response token, never more than max_len
    for max_len in range(2, len(p) + len(r) + 2):
        [(ids, n)] = common.encode_texts(tok, [prompt + resp], max_len)
        assert len(ids) == min(max_len, len(p) + len(r)) and 1 <= n < len(ids)
        assert ids[n:] == r[: len(ids) - n]  # the response is cut only from the right, after the prompt is gone


def test_encode_texts_bos_once_at_start():
    """No BOS lands mid-sequence (prompt and response are encoded separately): a BOS-adding tokenizer (Llama/OPT-like) puts exactly one BOS, at position 0."""
    tok = toy.train_tokenizer(CORPUS, 300, bos=True)
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    texts = list(dict.fromkeys(CORPUS))
    for text, (ids, n) in zip(texts, common.encode_texts(tok, texts, 512)):
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
        assert ids[n:-1] == tok(common.split_prompt(text)[1], add_special_tokens=False)["input_ids"]


def test_encode_texts_truncation_keeps_bos():
    """Truncation cuts the prompt from the left; it should not cut the BOS away with it (HF's own
    truncation_side="left" keeps special tokens). Found: common.encode_texts drops it, see the report."""
    tok = toy.train_tokenizer(CORPUS, 300, bos=True)
    text = "\n\nHuman: " + "Tell me a joke please. " * 5 + "\n\nAssistant: Paris is the capital of France."
    [(full, _)] = common.encode_texts(tok, [text], 512)
    [(ids, n)] = common.encode_texts(tok, [text], len(full) - 5)
    assert len(ids) == len(full) - 5
    assert ids[0] == tok.bos_token_id, (
        "encode_texts truncation p[-(max_len - len(r)):] removes the BOS at position 0: a truncated text reaches "
        "a Llama/OPT model without its BOS")


def test_make_batches_covers_every_index_once():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(103)]  # 103 = 6 steps of 16 + one of 7
    for group in (False, True):
        steps = common.make_batches(lengths, 16, 4, seed=3, group_by_length=group)
        flat = [i for step in steps for mb in step for i in mb]
        assert sorted(flat) == list(range(103))
        assert [sum(len(mb) for mb in step) for step in steps] == [16] * 6 + [7]
        sizes = [len(mb) for step in steps for mb in step]
        assert sizes[:-1] == [4] * (len(sizes) - 1) and sizes[-1] == 3
        assert steps == common.make_batches(lengths, 16, 4, seed=3, group_by_length=group)  # seeded
    assert common.make_batches(lengths, 16, 4, 3) != common.make_batches(lengths, 16, 4, 4)
    with pytest.raises(SystemExit):
        common.make_batches(lengths, 10, 4, 0)


def test_make_batches_group_by_length_pads_less():
    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(2048)]

    def padding(steps):
        return sum(max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb) for s in steps for mb in s)
    plain = padding(common.make_batches(lengths, 32, 8, 0, group_by_length=False))
    grouped = padding(common.make_batches(lengths, 32, 8, 0, group_by_length=True))
    assert grouped < 0.05 * plain, (grouped, plain)
    # ...and the grouped micro-batches are not served in length order (no short-to-long curriculum)
    means = [sum(lengths[i] for i in mb) / len(mb) for s in common.make_batches(lengths, 32, 8, 0) for mb in s]
    assert means != sorted(means) and means != sorted(means, reverse=True)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_make_batches_steps_independent_of_micro_batch(group_by_length):
    """micro_batch is in common.NO_EFFECT ("changes no number of a run", the Makefile picks it by model size),
    so which pairs form each optimizer step must not depend on it. Found: with group_by_length (the default)
    it does; see the report."""
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(200)]
    by_micro = {m: [sorted(i for mb in step for i in mb) for step in
                    common.make_batches(lengths, 16, m, seed=0, group_by_length=group_by_length)] for m in (8, 4)}
    assert by_micro[8] == by_micro[4], (
        "make_batches(group_by_length=True) sorts and shuffles micro-batches of size micro_batch, then cuts steps:"
        " step composition (hence the trained weights) changes with --micro_batch, which the stage cache ignores")


@dataclasses.dataclass
class _Args:
    n: int = 1
    lr: float = 0.1
    name: str = "x"
    flag: bool = False
    on: bool = True


def test_parse_args():
    a = common.parse_args(_Args, ["--n", "5", "--lr=1e-3", "--name", "a b", "--flag", "--no_on"])
    assert (a.n, a.lr, a.name, a.flag, a.on) == (5, 1e-3, "a b", True, False)
    assert common.parse_args(_Args, []) == _Args()
    assert common.parse_args(_Args, ["--flag", "--n", "2"]) == _Args(n=2, flag=True)  # bare flag before a key
    assert common.parse_args(_Args, ["--flag", "false", "--on=false"]) == _Args(flag=False, on=False)
    assert common.parse_args(_Args, ["--name="]).name == ""
    assert common.parse_args(_Args, ["--lr", "-0.5"]).lr == -0.5
    r = common.parse_args(rm_w2s.Args, ["--n-gt", "7", "--no_group_by_length", "--settings=none"])
    assert (r.n_gt, r.group_by_length, r.settings) == (7, False, "none")
    for bad in (["--nope", "1"], ["--n", "abc"], ["--n", "1.5"], ["--lr", "x"], ["--n"], ["n", "1"], ["--no_name"]):
        with pytest.raises(SystemExit):
            common.parse_args(_Args, bad)


def synthetic_raw(path):
    """Hub raw format: 7 single-turn distinct pairs, 4 multi-turn (one only on the rejected side), 2 identical."""
    single = [{"chosen": f"\n\nHuman: q{i}?\n\nAssistant: yes {i}", "rejected": f"\n\nHuman: q{i}?\n\nAssistant: no {i}"}
              for i in range(7)]
    multi = [{"chosen": f"\n\nHuman: a{i}\n\nAssistant: b\n\nHuman: c\n\nAssistant: d{i}",
              "rejected": f"\n\nHuman: a{i}\n\nAssistant: b\n\nHuman: c\n\nAssistant: e{i}"} for i in range(3)]
    multi.append({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: y\n\nHuman: z\n\nAssistant: w"})
    same = [{"chosen": f"\n\nHuman: s{i}\n\nAssistant: t", "rejected": f"\n\nHuman: s{i}\n\nAssistant: t"} for i in range(2)]
    rows = single[:3] + multi[:2] + same[:1] + single[3:] + multi[2:] + same[1:]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"rows": 13, "kept": 7, "dropped": {"multi_turn": 4, "no_assistant": 0, "identical": 2}}


def test_filter_single_turn(tmp_path):
    from datasets import load_dataset
    src = data_source("hh-rlhf-harmless-base")
    if src is not None:
        path, expected = src / "test.jsonl.gz", {"rows": 2312, "kept": 662, "dropped": {"multi_turn": 1650, "no_assistant": 0, "identical": 0}}
    else:
        path = tmp_path / "test.jsonl.gz"
        expected = synthetic_raw(path)
    rows = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(rows) == expected["rows"]
    kept, dropped = common.filter_single_turn(rows)
    assert len(kept) == expected["kept"] and dropped == expected["dropped"]
    for pair in kept:
        assert pair["chosen"].count(common.HUMAN) == 1 and pair["rejected"].count(common.HUMAN) == 1
        assert pair["chosen"] != pair["rejected"]
    assert common.filter_single_turn(common.read_jsonl(path)) == (kept, dropped)  # the plain reader agrees
    # both branches on hand-made rows, whatever the data: identical texts; a second turn on one side only
    one, two = "\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    assert common.filter_single_turn([{"chosen": one, "rejected": one}]) == ([], {"multi_turn": 0, "no_assistant": 0,
                                                                                   "identical": 1})
    assert common.filter_single_turn([{"chosen": one, "rejected": two}, {"chosen": two, "rejected": one}]) \
        == ([], {"multi_turn": 2, "no_assistant": 0, "identical": 0})
    assert common.filter_single_turn([{"chosen": one, "rejected": "\n\nHuman: a"}]) \
        == ([], {"multi_turn": 0, "no_assistant": 1, "identical": 0})


def synthetic_splits(root, n=60):
    """The paper's directory layout with known facts: one chosen text of test also in gt, one in w2s; prompt
    mismatches 2 (gt), 3 (w2s), 4 (test), none of them among the overlapping pairs."""
    def pairs(tag, mismatches):
        out = []
        for i in range(n):
            q = f"\n\nHuman: {tag} question {i}?\n\nAssistant:"
            q_r = q.replace("question", "query") if i >= n - mismatches else q
            out.append({"chosen": f"{q} good answer {tag}{i}", "rejected": f"{q_r} bad answer {tag}{i}"})
        return out
    gt, w2s, test = pairs("gt", 2), pairs("w2s", 3), pairs("test", 4)
    for i, (other, j) in ((10, (gt, 5)), (20, (w2s, 7))):  # the test pair takes another split's chosen text
        test[i] = {"chosen": other[j]["chosen"], "rejected": common.split_prompt(other[j]["chosen"])[0] + f" meh {i}"}
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train_gt", gt), ("train_w2s", w2s), ("test", test)):
        (root / f"harmless_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"n": n, "dropped": {"test_text_overlap": 2}, "mismatch": {"gt": 2, "w2s": 3, "test": 4}}


@pytest.fixture(scope="module")
def splits_dir(tmp_path_factory):
    src = data_source("hh-single-turn")
    if src is not None:
        # measured, and stated in ../shared/data/README.md
        return src, {"n": 4000, "dropped": {"test_text_overlap": 2}, "mismatch": {"gt": 6, "w2s": 7, "test": 14}}
    root = tmp_path_factory.mktemp("hh-single-turn")
    return root, synthetic_splits(root)


def split_args(data, n, **kw):
    return SimpleNamespace(**{"data": str(data), "n_gt": n, "n_w2s": n, "n_test": n, "n_extra": 0, "settings": "none",
                              "seed": 0, "helpful": "", **kw})


def test_load_splits_small_disjoint(splits_dir):
    data, _ = splits_dir
    splits, stats = common.load_splits(split_args(data, 5))
    assert [len(splits[s]) for s in ("gt", "w2s", "test", "extra")] == [5, 5, 5, 0]
    texts = [t for s in splits.values() for p in s for t in (p["chosen"], p["rejected"])]
    assert len(texts) == len(set(texts)) == 30
    assert splits["gt"] == common.read_jsonl(Path(data) / "harmless_train_gt.jsonl")[:5]  # file order, no shuffle
    assert stats["dropped"] == {} and stats["short"] == {} and stats["n_test"] == 5


def test_load_splits_full(splits_dir):
    data, expected = splits_dir
    n = expected["n"]
    files = {s: common.read_jsonl(Path(data) / f"harmless_{f}.jsonl")
             for s, f in (("gt", "train_gt"), ("w2s", "train_w2s"), ("test", "test"))}
    # own count: pairs of w2s / test sharing a text with an earlier split
    earlier, own_drops, kept_files = set(), {}, {}
    for s in ("gt", "w2s", "test"):
        clash = [p["chosen"] in earlier or p["rejected"] in earlier for p in files[s]]
        if any(clash):
            own_drops[f"{s}_text_overlap"] = sum(clash)
        kept_files[s] = [p for p, c in zip(files[s], clash) if not c]
        earlier.update(t for p in kept_files[s] for t in (p["chosen"], p["rejected"]))
    assert own_drops == expected["dropped"]

    splits, stats = common.load_splits(split_args(data, n))
    assert stats["dropped"] == expected["dropped"]
    # the test file has exactly n rows, so the two dropped pairs leave the test split 2 short
    assert stats["short"] == {"test": 2} and stats["n_test"] == n - 2 == len(splits["test"])
    assert stats["n_gt"] == stats["n_w2s"] == n
    texts = [t for s in splits.values() for p in s for t in (p["chosen"], p["rejected"])]
    assert len(texts) == len(set(texts))
    for s in ("gt", "w2s", "test"):
        assert splits[s] == kept_files[s]
        own = sum(common.split_prompt(p["chosen"])[0] != common.split_prompt(p["rejected"])[0] for p in kept_files[s])
        # README's counts are over whole files; neither overlapping test pair has a prompt mismatch, so they hold
        assert stats[f"prompt_mismatch_{s}"] == own == expected["mismatch"][s]


# ---- DPO and SimPO

def causal_lm(path):
    tok = common.load_tokenizer(path)
    torch.manual_seed(0)
    return tok, common.load_model(path, AutoModelForCausalLM, tok, CPU)


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


# texts of very different prompt and response lengths, two with "!" (GPT-2's token 0)
PO_TEXTS = [
    "\n\nHuman: Hi!\n\nAssistant: No!",
    "\n\nHuman: " + "Tell me a joke, please! " * 4 + "\n\nAssistant: Why did the chicken cross the road?",
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital of France. Try reading a classic "
    "novel, like Pride and Prejudice.",
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour.",
]


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


def test_sequence_logps_batched_equals_unbatched(tiny):
    """Right padding changes nothing: per-example log-probs in a right-padded batch equal the unbatched ones, through both paths
    that DPO/SimPO use: common.pair_logps (evaluation and DPO's reference) and the training forward."""
    tok, model = causal_lm(tiny)
    seqs = common.encode_texts(tok, PO_TEXTS, 128)
    with torch.no_grad():
        alone = [common.sequence_logps(model(input_ids=torch.tensor([s])).logits, torch.tensor([s]),
                                       common.collate([(s, n)], tok.pad_token_id, CPU)[1]) for s, n in seqs]
        batched, counts = common.forward_logps(model, seqs, tok.pad_token_id)  # right-padded to the longest
    pairs = common.pair_logps(model, list(zip(seqs[0::2], seqs[1::2])), tok.pad_token_id, 1, contextlib.nullcontext)
    evaluated = [x for pair in pairs for x in pair]
    for i, (s_alone, n_alone) in enumerate(alone):
        assert batched[i].item() == pytest.approx(s_alone.item(), abs=1e-4)
        assert evaluated[i][0] == pytest.approx(s_alone.item(), abs=1e-4)
        assert counts[i].item() == evaluated[i][1] == n_alone.item()


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
    """DPO sums log-probs, SimPO averages them: dpo_batch_loss feeds dpo_loss the SUMMED response log-probs, simpo_batch_loss feeds simpo_loss
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
            dpo, dpo_metrics = dpo_w2s.dpo_batch_loss(model, pad, 0.1, alpha, pack)(examples)
            simpo, simpo_metrics = simpo_w2s.simpo_batch_loss(model, pad, 2.0, 1.0, alpha, pack)(examples)

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


def fake_experiment(tmp_path, margins, correct, **args):
    """What common.student_data reads: args, splits and a labeller folder whose labels.jsonl has the given
    margins and "correct" fields (so a test can scramble the latter)."""
    exp = SimpleNamespace()
    exp.args = SimpleNamespace(**{"conf_threshold": 0.0, "conf_scale": 1.0, "drop_weak_errors": False, **args})
    exp.splits = {"w2s": [{"chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(len(margins))],
                  "extra": [{"chosen": "helpful", "rejected": "unhelpful"}]}
    folder = tmp_path / "labeller"
    rows = common.label_rows(margins)
    for row, c in zip(rows, correct):
        row["correct"] = c
    common.write_jsonl(folder / "labels.jsonl", rows)
    return exp, {"dir": str(folder), "labelled": "w2s"}


def student_data(exp, setting, labeller):
    """The data of the student of `setting` (none, implicit, explicit) or, with "none", the intermediate model."""
    return common.student_data(exp.args, exp.splits, labeller, with_helpful=setting == "implicit")


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
            exp, labeller = fake_experiment(tmp_path / "a", margins, truth, conf_threshold=threshold, **labels)
            exp2, labeller2 = fake_experiment(tmp_path / "b", margins, scrambled, conf_threshold=threshold, **labels)
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
    exp, labeller = fake_experiment(tmp_path / "c", margins, scrambled, conf_threshold=0.6, drop_weak_errors=True,
                                    **labels)
    pairs, _ = student_data(exp, "none", labeller)
    keep = [i for i, m in enumerate(margins) if 1 / (1 + math.exp(-abs(m))) >= 0.6 and scrambled[i]]
    assert pairs == [exp.splits["w2s"][i] for i in keep]


def test_orient(tmp_path):
    pairs = [{"chosen": f"a{i}", "rejected": f"b{i}"} for i in range(5)]
    original = copy.deepcopy(pairs)
    oriented, agree = common.orient(pairs, [1.0, 0.0, 0.8, 0.2, 0.5])
    # target > 0.5: the labeller prefers chosen; 0.5 (no preference) is not a preference for chosen
    assert oriented == [{"chosen": "a0", "rejected": "b0"}, {"chosen": "b1", "rejected": "a1"},
                        {"chosen": "a2", "rejected": "b2"}, {"chosen": "b3", "rejected": "a3"},
                        {"chosen": "b4", "rejected": "a4"}]
    assert agree == [True, False, True, False, False]
    assert pairs == original  # the ground-truth-oriented pairs are left as they were
    # through the students' data: chosen is the response the labeller's margin prefers
    exp, labeller = fake_experiment(tmp_path, [2.0, -1.0, 0.5, -0.1], [True, False, True, False])
    oriented, agree = common.orient(*student_data(exp, "none", labeller))
    assert oriented == [{"chosen": "good 0", "rejected": "bad 0"}, {"chosen": "bad 1", "rejected": "good 1"},
                        {"chosen": "good 2", "rejected": "bad 2"}, {"chosen": "bad 3", "rejected": "good 3"}]
    assert agree == [True, False, True, False]


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
    """(batch_loss, size) as run_model passes them to train: the method's loss (1 unit per pair) or SFT's
    (1 unit per response token)."""
    if objective == "sft":
        return common.sft_loss(model, pad_id), common.response_tokens
    if module is dpo_w2s:
        return dpo_w2s.dpo_batch_loss(model, pad_id, 0.1, alpha, True), lambda e: 1
    return simpo_w2s.simpo_batch_loss(model, pad_id, 2.0, 1.0, alpha, True), lambda e: 1


def run_po_train(module, objective, model, examples, pad_id, log_path, alpha, **overrides):
    """module.train for one epoch with a RecordingOptimizer (install it first); returns the metrics rows."""
    args = module.Args(**{"batch_size": 8, "micro_batch": 8, "epochs": 1, "warmup_ratio": 0.0, "grad_clip": 1e9,
                          "seed": 0, "log_every": 1000, **overrides})
    batch_loss, size = po_objective(module, objective, model, pad_id, alpha)
    if objective == "sft":
        examples = [{"chosen": e["chosen"]} for e in examples]
    module.train(model, examples, batch_loss, units=size, lr=1e-3, epochs=1, args=args, log_path=log_path,
                 autocast=contextlib.nullcontext, desc=log_path.stem)
    return [json.loads(line) for line in log_path.read_text().splitlines()]


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
    policy itself (as run_model does after SFT) and the weights held still, every step's loss is log 2 and the
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


# ---- length-grouped batching and packing

def test_grouped_and_ungrouped_batching_same_per_pair_losses_and_predictions(tiny):
    """Same weights: the per-pair losses over one epoch's micro-batches, and the evaluation margins, do not depend
    on how pairs are grouped into micro-batches (length-grouped or shuffled only), nor on whether a pair's texts
    are packed into one row, nor on the evaluation's length-sorted order."""
    tok, model = reward_model(tiny)
    model.eval()
    examples = encoded_examples(tok, 24, seed=5)
    def per_pair_losses(group, pack):
        lengths = [max(common.row_lengths(common.example_texts(e), pack)) for e in examples]
        out = {}
        with torch.no_grad():
            for step in common.make_batches(lengths, 8, 4, seed=1, group_by_length=group):
                for mb in step:
                    batch = [examples[i] for i in mb]
                    texts = [s for e in batch for s in (e["chosen"], e["rejected"])]
                    rewards = rewards_of(model, texts, tok.pad_token_id, pack)
                    p = torch.tensor([e["target"] for e in batch])
                    losses = rm_w2s.soft_label_loss(rewards[0::2], rewards[1::2], p)
                    out.update(zip(mb, losses.tolist()))
        return out

    grouped = per_pair_losses(True, True)
    for group, pack in [(False, True), (True, False), (False, False)]:
        other = per_pair_losses(group, pack)
        assert sorted(grouped) == sorted(other) == list(range(len(examples)))
        for i in grouped:
            assert grouped[i] == pytest.approx(other[i], abs=1e-5), (group, pack)
    pairs = [(e["chosen"], e["rejected"]) for e in examples]
    batched = rm_w2s.score_pairs(model, pairs, tok.pad_token_id, 4, contextlib.nullcontext)
    alone = rm_w2s.score_pairs(model, pairs, tok.pad_token_id, 1, contextlib.nullcontext)
    assert batched == pytest.approx(alone, abs=1e-5)
    # and the same for the policy log-probs that DPO and SimPO compare
    tok, lm = causal_lm(tiny)
    batched = common.pair_logps(lm, pairs, tok.pad_token_id, 4, contextlib.nullcontext)
    alone = common.pair_logps(lm, pairs, tok.pad_token_id, 1, contextlib.nullcontext)
    for (bc, br), (ac, ar) in zip(batched, alone):
        assert bc[0] == pytest.approx(ac[0], abs=1e-4) and br[0] == pytest.approx(ar[0], abs=1e-4)
        assert (bc[1], br[1]) == (ac[1], ar[1])


def test_padded_tokens_counts_padding():
    steps = [[[0, 1]], [[2]]]
    real, computed = bench.padded_tokens(steps, [(3, 5), (2, 2), (4, 1)])
    assert (real, computed) == (3 + 5 + 2 + 2 + 4 + 1, 4 * 5 + 2 * 4)


def test_collate_packs_a_pair_into_one_block_diagonal_row():
    """Hand-checked layout: chosen then rejected in one row, positions restarting at the rejected text, a
    causal mask that never crosses from one text to the other, padding a block of its own. A text's first token
    is never a response token, even with no prompt: in a packed row the text before it would predict it."""
    inputs, resp, rows, last = common.collate([([5, 6, 7], 1), ([8, 9], 1), ([4], 0), ([3], 0)], 0, CPU, pack=True)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    assert rows.tolist() == [0, 0, 1, 1] and last.tolist() == [2, 4, 0, 1]
    assert resp.int().tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [0] * 5, [0] * 5]  # a first token is never scored
    mask = inputs["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert mask[:, 0].any(-1).all()  # every query sees at least itself: no NaN rows in attention


@pytest.mark.parametrize("arch", ["tiny", "tiny_llama", "tiny_opt", "tiny_neox"])
def test_packed_pairs_equal_texts_alone(arch, request):
    """Packing is exact on GPT-2 (learned positions), Llama and GPT-NeoX (rotary) and OPT (learned, offset 2):
    rewards and summed log-probs of packed pairs equal those of each text alone and of a row per text;
    load_model(pack=True) passes its own check on each."""
    path = request.getfixturevalue(arch)
    tok, rm = reward_model(path)
    common.check_packing(rm.body, tok.pad_token_id)
    tok, lm = causal_lm(path)
    common.load_model(path, AutoModelForCausalLM, tok, CPU, pack=True)
    seqs = common.encode_texts(tok, PO_TEXTS, 128)
    assert len({len(s) for s, _ in seqs}) > 2  # texts of different lengths: packed rows pad
    with torch.no_grad():
        alone_r = torch.cat([rewards_of(rm, [s], tok.pad_token_id) for s in seqs])
        alone_lp = torch.stack([common.forward_logps(lm, [s], tok.pad_token_id)[0][0] for s in seqs])
        for pack in (True, False):
            torch.testing.assert_close(rewards_of(rm, seqs, tok.pad_token_id, pack), alone_r, atol=1e-5, rtol=1e-4)
            sums, counts = common.forward_logps(lm, seqs, tok.pad_token_id, pack)
            torch.testing.assert_close(sums, alone_lp, atol=1e-4, rtol=1e-4)
            assert counts.tolist() == [len(s) - n for s, n in seqs]
        # the test bites: without the block-diagonal mask, each rejected text would see its chosen text
        inputs, _, rows, last = common.collate(seqs, tok.pad_token_id, CPU, pack=True)
        T = inputs["input_ids"].shape[1]
        inputs["attention_mask"] = torch.ones(T, T, dtype=torch.bool).tril().expand_as(inputs["attention_mask"])
        leaky = rm(inputs, rows, last)
        assert not torch.allclose(leaky[1::2], alone_r[1::2], atol=1e-3)


class IgnoresPacking(torch.nn.Module):
    """A model that drops the attention mask or the position ids it is given, as some architectures do."""
    def __init__(self, model, keep):
        super().__init__()
        self.model, self.config, self.keep = model, model.config, keep

    def forward(self, input_ids, **kwargs):
        return self.model(input_ids=input_ids, **{k: v for k, v in kwargs.items() if k in self.keep})


@pytest.mark.parametrize("arch, keep", [("tiny", ()), ("tiny", ("attention_mask",)), ("tiny_opt", ("position_ids",))])
def test_check_packing_refuses_a_model_that_ignores_the_mask_or_positions(arch, keep, request):
    """(GPT-2 given position_ids and no mask builds the block-diagonal mask itself from the restarts, so dropping
    only the mask is tested on OPT, which does not.)"""
    tok, lm = causal_lm(request.getfixturevalue(arch))
    with pytest.raises(SystemExit, match="--no_pack"):
        common.check_packing(IgnoresPacking(lm, keep), tok.pad_token_id)
    common.check_packing(IgnoresPacking(lm, ("attention_mask", "position_ids")), tok.pad_token_id)


def test_check_packing_refuses_eager_attention(tiny):
    """Eager attention adds a 4D mask to the scores, so a boolean mask would not mask: refused, not silently wrong."""
    tok = common.load_tokenizer(tiny)
    eager = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager")
    with pytest.raises(SystemExit, match="eager attention"):
        common.check_packing(eager, tok.pad_token_id)


def test_packing_pads_at_most_ten_percent_on_the_bench_workload(tmp_path):
    """The padding target (at most 10% of computed tokens), on make bench's own workload and batching (batch 32, micro-batch 8, max length 512):
    packed pairs pad <= 10% of computed tokens; a row per text pads far more (a pair's texts differ in length)."""
    args = SimpleNamespace(data=str(SHARED_DATA / "hh-single-turn"), out_dir=str(tmp_path), bench_model="")
    pairs, path = bench.workload(args)
    tok = common.load_tokenizer(path)
    encoded = common.encode_pairs(tok, pairs, 512, eos=False)
    share = {}
    for pack in (True, False):
        rows = [common.row_lengths(pair, pack) for pair in encoded]
        steps = common.make_batches([max(r) for r in rows], 32, 8, seed=0)
        real, computed = bench.padded_tokens(steps, rows)
        share[pack] = 1 - real / computed
    assert share[True] <= 0.10 < 0.20 < share[False], share


def test_help_lists_every_option_with_its_comment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(rm_w2s.Args, ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(rm_w2s.Args):
        assert f"--{f.name} " in out
    assert "weight of the explicit-conflict term" in out


# ---- the paper's defaults, and numbers a reader can trust

def test_defaults_are_the_papers():
    """Each default is the paper's code (keven980716/weak-to-strong-deception: run_*.sh, train*.py)."""
    rm, dpo, simpo = rm_w2s.Args(), dpo_w2s.Args(), simpo_w2s.Args()
    assert (rm.lr, rm.batch_size, rm.epochs, rm.warmup_ratio, rm.grad_clip, rm.weight_decay, rm.max_len) \
        == (1e-5, 32, 1, 0.0, 0.0, 0.0, 512)  # Adam, cosine annealing from the first step, no clipping
    assert (rm.conf_scale, rm.alpha, rm.hard_labels) == (1.0, 0.5, False)  # soft labels p = sigmoid(margin)
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


def test_dpo_confidence_scale_is_the_papers():
    """DPO: sigmoid(summed log-ratio / 50); a summed ratio of 50 * ln 3 is confidence 0.75 (3 to 1)."""
    assert float(common.confidence(50 * math.log(3), 50.0)) == pytest.approx(0.75)
    margins = [10.0, -60.0, 55.0, 100.0]  # sigmoid(|m| / 50): 0.550, 0.769, 0.750, 0.881
    assert common.confident_subset(margins, 0.75, scale=50.0) == [1, 2, 3]
    assert common.confident_subset(margins, 0.75) == [0, 1, 2, 3]  # scale 1 keeps everything above |m| 1.1


def test_implicit_student_gets_as_many_helpful_pairs_as_weak_pairs(tmp_path):
    """The paper's code: after the confidence filter, the helpfulness pairs are cut to the kept weak pairs."""
    margins = [3.0, 0.1, -2.5, 0.05, -0.2, 4.0]  # confidence >= 0.9 keeps 3 of them
    exp, labeller = fake_experiment(tmp_path, margins, [m > 0 for m in margins], conf_threshold=0.9)
    exp.splits["extra"] = [{"chosen": f"helpful {i}", "rejected": f"unhelpful {i}"} for i in range(10)]
    pairs, targets = student_data(exp, "implicit", labeller)
    assert pairs == [exp.splits["w2s"][i] for i in (0, 2, 5)] + exp.splits["extra"][:3]
    assert targets == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    exp.args.conf_threshold = 0.0  # no filter: all 6 weak pairs, 6 of the 10 helpful ones
    pairs, _ = student_data(exp, "implicit", labeller)
    assert len(pairs) == 12 and pairs[6:] == exp.splits["extra"][:6]


def test_reward_model_encoding_keeps_the_end_of_an_overlong_response(tiny):
    tok = common.load_tokenizer(tiny)
    long_text = "\n\nHuman: hi\n\nAssistant:" + " Paris is the capital of France." * 20 + " Yes!"
    [(ids, n_prompt)] = common.encode_texts(tok, [long_text], 24, eos=False, keep_response_end=True)
    response = tok(common.split_prompt(long_text)[1], add_special_tokens=False)["input_ids"]
    assert len(ids) == 24 and n_prompt == 1 and ids[1:] == response[-23:]  # one prompt token, the response's end
    [(ids, n_prompt)] = common.encode_texts(tok, [long_text], 24)  # DPO / SimPO: the response's start, no EOS
    assert n_prompt == 1 and ids[1:] == response[:23]


def predicted_stages(tmp_path, correct_by_stage):
    """Finished stages as build_results reads them: each one's predictions.jsonl (margin +1 where the stage is
    right, -1 where wrong) and its summary."""
    stages = {}
    for name, correct in correct_by_stage.items():
        d = tmp_path / name
        common.write_jsonl(d / "predictions.jsonl", [{"margin": 1.0 if c else -1.0, "correct": c} for c in correct])
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
    results = common.build_results(stages, rm_w2s.Args(), {"dropped": {}}, test)
    assert results["length_baseline"]["accuracy"] == 0.5  # the equal-length pair counts as wrong, like a tie
    assert results["length_baseline"]["equal_length"] == 1
    # agreement on the 3 pairs where the rule chose: strong and student-none are wrong on the equal-length pair,
    # which must not count as agreeing with a rule that made no choice there (it did before: 0.75 each)
    assert results["length_baseline"]["agreement"] == {"weak": 1.0, "strong": 2 / 3, "student-none": 2 / 3}
    flagged = [n for n in results["notes"] if "shorter response" in n]
    assert len(flagged) == 1 and flagged[0].startswith("weak agrees") and "100.0%" in flagged[0]


def test_length_baseline_when_no_response_is_shorter(tmp_path):
    """Equal-length responses everywhere (the toy task's REFUSE / COMPLY): the rule never chooses, so agreement
    is null, and a model that is always wrong is not flagged as following length."""
    p = "\n\nHuman: q\n\nAssistant:"
    test = [{"chosen": p + " REFUSE", "rejected": p + " COMPLY"}, {"chosen": p + " COMPLY", "rejected": p + " REFUSE"}]
    assert common.length_rule(test) == [None, None]
    stages = predicted_stages(tmp_path, {"weak": [False, False], "strong": [False, False]})  # both always wrong
    results = common.build_results(stages, rm_w2s.Args(), {"dropped": {}}, test)
    assert results["length_baseline"] == {"accuracy": 0.0, "equal_length": 2,
                                          "agreement": {"weak": None, "strong": None}}
    assert not [n for n in results["notes"] if "shorter response" in n]


def test_training_health_flags_divergence():
    assert not common.training_health([0.693, 0.6, 0.5, 0.4])["diverged"]
    assert not common.training_health([0.693] * 20)["diverged"]  # learnt nothing, but did not diverge
    assert common.training_health([0.693, 5.0, 1e6, 2e6])["diverged"]
    health = common.training_health([0.7] + [0.6] * 18 + [1.6])  # the last tenth of 20 steps: 2 steps
    assert health == {"first_loss": 0.7, "final_loss": pytest.approx(1.1), "diverged": False}


def test_check_finite_and_step_loss_stop_with_the_place():
    common.check_finite([0.1, -2.0, 0.0], "x")
    with pytest.raises(SystemExit, match=r"\[weak\] labels.jsonl: 2 of 3 margins are not finite \(first: pair 1\)"):
        common.check_finite([0.1, float("nan"), float("inf")], "[weak] labels.jsonl")
    with pytest.raises(SystemExit, match=r"\[strong\] the loss is nan at step 7"):
        common.check_step_loss(float("nan"), "strong", 7)


# ---- options and inputs: one clear line, before anything trains

@pytest.mark.parametrize("module,option,value", [
    (rm_w2s, "max_len", "1"), (rm_w2s, "epochs", "0"), (rm_w2s, "alpha", "-1"), (rm_w2s, "batch_size", "0"),
    (rm_w2s, "lr", "inf"), (rm_w2s, "lr", "0"), (rm_w2s, "n_test", "0"), (rm_w2s, "conf_threshold", "1"),
    (rm_w2s, "warmup_ratio", "1.5"), (rm_w2s, "weak_max_len", "2"), (rm_w2s, "grad_clip", "-1"),
    (dpo_w2s, "beta", "0"), (dpo_w2s, "sft_lr", "-1e-6"), (dpo_w2s, "conf_scale", "0"), (simpo_w2s, "gamma", "nan"),
])
def test_bad_option_is_one_line_naming_it(module, option, value, tmp_path):
    with pytest.raises(SystemExit) as info:
        module.main(["--data", "toy", "--out_dir", str(tmp_path), f"--{option}", value])
    message = str(info.value)
    assert message.startswith(f"error: --{option} must be") and "\n" not in message
    assert not list(tmp_path.iterdir()), "nothing is built or written before the options are checked"


@pytest.mark.parametrize("name,expected", [
    ("tiny:0x32", "a tiny model is tiny:LxD"), ("tiny:2x33", "a tiny model is tiny:LxD"), ("tiny:2", "tiny:LxD"),
    ("/no/such/folder", "no such file or folder"), ("./missing", "no such file or folder"),
    ("missing.gguf", "no such file or folder"),
])
def test_bad_model_name_is_one_line(name, expected, tmp_path):
    with pytest.raises(SystemExit, match=expected):
        rm_w2s.main(["--data", "toy", "--out_dir", str(tmp_path), "--weak", name])


def test_model_folder_without_config_is_named(tmp_path):
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(SystemExit, match="holds no model config"):
        common.check_model_name("strong", str(tmp_path / "notamodel"))
    common.check_model_name("strong", "gpt2")  # Hub ids pass untouched
    common.check_model_name("strong", "org/model-name")


@pytest.mark.parametrize("content,expected", [
    (b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n' * 4 + b'{"chosen": oops}\n',
     r":5: not valid JSON"),
    (b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}\n', r':1: no "rejected" text'),
    (b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n\xff\xfe\n',
     r":2: not UTF-8 text"),
    (b'\n{"chosen": "\\n\\nHuman: a b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n',
     r":2: the \"chosen\" text has no '\\n\\nAssistant:' turn"),
])
def test_bad_data_line_names_file_and_line(content, expected, tmp_path):
    path = tmp_path / "harmless_test.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as info:
        common.read_pairs(path)
    message = str(info.value)
    assert message.startswith(f"error: {path}:") and re.search(expected, message) and "\n" not in message, message


def write_split_files(root, sizes, identical=0):
    root.mkdir(parents=True, exist_ok=True)
    for name, n in sizes.items():
        rows = [{"chosen": f"\n\nHuman: {name} {i}?\n\nAssistant: good {i}", "rejected": f"\n\nHuman: {name} {i}?\n\nAssistant: bad {i}"}
                for i in range(n)]
        for row in rows[:identical]:
            row["rejected"] = row["chosen"]
        (root / f"harmless_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_identical_pairs_are_dropped_and_counted(tmp_path):
    write_split_files(tmp_path, {"train_gt": 10, "train_w2s": 10, "test": 10}, identical=2)
    splits, stats = common.load_splits(split_args(tmp_path, 10))
    assert [len(splits[s]) for s in ("gt", "w2s", "test")] == [8, 8, 8]
    assert stats["dropped"] == {"gt_identical": 2, "w2s_identical": 2, "test_identical": 2}
    assert all(p["chosen"] != p["rejected"] for s in ("gt", "w2s", "test") for p in splits[s])


@pytest.mark.parametrize("empty", ["train_gt", "train_w2s", "test"])
def test_empty_split_file_stops_before_training(empty, tmp_path):
    write_split_files(tmp_path, {"train_gt": 6, "train_w2s": 6, "test": 6})
    (tmp_path / f"harmless_{empty}.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match=f"no usable pairs for the .* split in {tmp_path / f'harmless_{empty}.jsonl'}"):
        common.load_splits(split_args(tmp_path, 6))


def test_write_atomic_respects_the_umask_and_leaves_no_temp_file(tmp_path):
    old = os.umask(0o022)
    try:
        common.write_json(tmp_path / "a.json", {"x": 1})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        with pytest.raises(TypeError):
            common.write_atomic(tmp_path / "b.json", None)  # fails while writing
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_cache_digests_follow_code_models_and_what_a_stage_reads(tmp_path, tiny):
    code = tmp_path / "code.py"
    code.write_text("x = 1\n")
    before = common.code_digest([code])
    code.write_text("x = 2\n")
    assert common.code_digest([code])["code"] != before["code"]
    assert set(before["versions"]) == {"torch", "transformers"}
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    d0 = common.model_digest(str(model))
    assert common.model_digest(str(model)) == d0 and common.model_digest("gpt2") == "gpt2"
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # new weights under the same path
    assert common.model_digest(str(model)) != d0
    args = rm_w2s.Args()
    key = common.stage_key(args, model=d0, max_len=512, alpha=0.0, data="d", code="c")
    assert key == common.stage_key(dataclasses.replace(args, alpha=0.9, settings="none", n_extra=7, micro_batch=2),
                                   model=d0, max_len=512, alpha=0.0, data="d", code="c")  # what it does not read
    for change in ({"model": "other"}, {"alpha": 0.5}, {"data": "e"}, {"code": "changed"}):
        assert key != common.stage_key(args, **{**dict(model=d0, max_len=512, alpha=0.0, data="d", code="c"), **change})
    assert key != common.stage_key(dataclasses.replace(args, lr=2e-5), model=d0, max_len=512, alpha=0.0, data="d", code="c")
