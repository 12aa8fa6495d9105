"""Data and batches: reading the data files (and their errors, naming file and line), the splits, encoding
and truncation, batching, padding and packing (every text scores as it does alone).

Data: the offline copies in ../shared/data (override with W2S_SHARED_DATA=<dir>). Where that folder does not
exist (a user's clone), the data tests run on small synthetic files written here with known counts, and say so.
"""
import contextlib
import gzip
import json
import os
import random
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from tools import bench
import common
import rm_w2s
import runs
import toy
from conftest import CORPUS, CPU, PO_TEXTS, causal_lm, encoded_examples, reward_model, rewards_of


SHARED_DATA = Path(os.environ.get("W2S_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


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


# ---- data files and splits

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
        # counted on the paper's three files: 2 test pairs share a text with gt or w2s; prompts differ in 6, 7, 14
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


@pytest.mark.parametrize("damage", ["cut short", "not gzip"])
def test_a_damaged_gzip_file_is_one_line_naming_it(damage, tmp_path):
    """A .jsonl.gz whose copy stopped part-way (gzip's EOFError names no file) or that is not gzip at all, given
    to --helpful: one line naming the file, before anything trains."""
    write_split_files(tmp_path, {"train_gt": 6, "train_w2s": 6, "test": 6})
    rows = [{"chosen": f"\n\nHuman: help {i}?\n\nAssistant: sure, {i}", "rejected": f"\n\nHuman: help {i}?\n\nAssistant: no"}
            for i in range(300)]
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    helpful = tmp_path / "helpful.jsonl.gz"
    helpful.write_bytes(data[: len(data) // 2] if damage == "cut short" else b"not gzip\n")
    with pytest.raises(SystemExit) as info:
        common.load_splits(split_args(tmp_path, 6, n_extra=4, settings="none,implicit", helpful=str(helpful)))
    message = str(info.value)
    assert message.startswith(f"error: {helpful}: cut short or damaged after ") and "\n" not in message, message


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


# ---- tokens

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


def test_reward_model_encoding_keeps_the_end_of_an_overlong_response(tiny):
    tok = common.load_tokenizer(tiny)
    long_text = "\n\nHuman: hi\n\nAssistant:" + " Paris is the capital of France." * 20 + " Yes!"
    [(ids, n_prompt)] = common.encode_texts(tok, [long_text], 24, eos=False, keep_response_end=True)
    response = tok(common.split_prompt(long_text)[1], add_special_tokens=False)["input_ids"]
    assert len(ids) == 24 and n_prompt == 1 and ids[1:] == response[-23:]  # one prompt token, the response's end
    [(ids, n_prompt)] = common.encode_texts(tok, [long_text], 24)  # DPO / SimPO: the response's start, no EOS
    assert n_prompt == 1 and ids[1:] == response[:23]


# ---- batches

def test_make_batches_covers_every_index_once(tmp_path):
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
    with pytest.raises(SystemExit, match="--batch_size 10 must be a multiple of --micro_batch 4"):  # checked up front
        runs.check_args(rm_w2s.Args(batch_size=10, micro_batch=4, out_dir=str(tmp_path)))


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
    """micro_batch is in runs.NO_EFFECT ("changes no number of a run", the Makefile picks it by model size),
    so which pairs form each optimizer step must not depend on it. Found: with group_by_length (the default)
    it does; see the report."""
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(200)]
    by_micro = {m: [sorted(i for mb in step for i in mb) for step in
                    common.make_batches(lengths, 16, m, seed=0, group_by_length=group_by_length)] for m in (8, 4)}
    assert by_micro[8] == by_micro[4], (
        "make_batches(group_by_length=True) sorts and shuffles micro-batches of size micro_batch, then cuts steps:"
        " step composition (hence the trained weights) changes with --micro_batch, which the stage cache ignores")


# ---- padding: masks from lengths, never from token values

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
