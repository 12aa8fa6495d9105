"""The science the three methods share (CleanRL's rule: the method is never shared; each method script holds
its loss, its model, its training loop and its experiment in main()): data and splits, models and tokens,
batches and packing, log-probs, the optimizer's schedule, weak labels, what a stage writes, torchrun, and the
measures (knowledge space, DS, PGR, the conflict tax). runs.py makes runs safe; toy.py and pretrained.py build
local models. Nothing here runs at import time.
"""
import atexit
import gzip
import json
import math
import os
import random
import sys
import zipfile
import zlib
from collections import namedtuple
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


# ----------------------------------------------------------------------------------------------------
# device, seeds

def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def device():  # the GPU where there is one (under torchrun: this rank's own), else the CPU
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_precision(precision):
    """auto -> bf16 where the chip computes it natively (CUDA; CPUs with AMX or AVX512-BF16), else fp32 (torch
    would emulate bf16, slowly)."""
    if precision != "auto":
        return precision
    native = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bf16" if native else "fp32"


def autocast(precision):
    """The context each forward runs in: bf16 autocast over fp32 master weights (fp16 would need a GradScaler
    and gives NaN in DPO), or nothing for fp32. Heads, log-softmax and losses stay fp32 either way."""
    precision = resolve_precision(precision)
    if precision == "bf16":
        return lambda: torch.autocast(device().type, dtype=torch.bfloat16)
    if precision == "fp32":
        return nullcontext
    raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")


# ----------------------------------------------------------------------------------------------------
# preference data: every pair is {"chosen": text, "rejected": text}, oriented by ground truth

PromptResponse = namedtuple("PromptResponse", "prompt response")


def split_prompt(text):
    """The prompt is everything up to and including the LAST "\\n\\nAssistant:": earlier Assistant turns are
    context; only the last one is the response being compared."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        raise ValueError(f"no {ASSISTANT!r} in text: {text[:80]!r}")
    return PromptResponse(text[: i + len(ASSISTANT)], text[i + len(ASSISTANT):])


def filter_single_turn(rows):
    """(pairs whose texts each hold one Human turn and an Assistant turn, and differ; dropped counts by reason)."""
    kept, dropped = [], {"multi_turn": 0, "no_assistant": 0, "identical": 0}
    for row in rows:
        c, r = row["chosen"], row["rejected"]
        if c.count(HUMAN) != 1 or r.count(HUMAN) != 1:
            dropped["multi_turn"] += 1
        elif ASSISTANT not in c or ASSISTANT not in r:
            dropped["no_assistant"] += 1
        elif c == r:
            dropped["identical"] += 1
        else:
            kept.append({"chosen": c, "rejected": r})
    return kept, dropped


def messages_to_text(messages):  # CAI's chat messages -> the HH "\n\nHuman: ...\n\nAssistant: ..." text
    role = {"user": HUMAN, "assistant": ASSISTANT}
    return "".join(f"{role[m['role']]} {m['content'].strip()}" for m in messages if m["role"] in role)


def iter_jsonl(path):
    """(line number, row) for each non-blank line of a jsonl file (gzipped if it ends in .gz). A bad line
    stops the run with one line naming the file, the line and what is wrong; so does a file cut short."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist")
    opener = gzip.open if str(path).endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is not content
                except UnicodeDecodeError as e:
                    raise SystemExit(f"error: {path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})")
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"error: {path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})")
    except (EOFError, OSError, zlib.error) as e:  # a gzip file cut short (EOFError) or damaged, an unreadable disk
        raise SystemExit(f"error: {path}: cut short or damaged after {lineno} lines ({type(e).__name__}: {e})")


def read_jsonl(path):
    return [row for _, row in iter_jsonl(path)]


def read_pairs(path):
    """Preference pairs from a jsonl file: "chosen" and "rejected" texts, each with an Assistant turn."""
    pairs = []
    for lineno, row in iter_jsonl(path):
        for key in ("chosen", "rejected"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise SystemExit(f'error: {path}:{lineno}: no "{key}" text')
            if ASSISTANT not in row[key]:
                raise SystemExit(f'error: {path}:{lineno}: the "{key}" text has no {ASSISTANT!r} turn')
        pairs.append({"chosen": row["chosen"], "rejected": row["rejected"]})
    return pairs


def load_hub_hh(data_dir):
    """Anthropic/hh-rlhf's `data_dir` part, or one line saying why not (offline and not cached, no network) and how
    to give local files instead: the datasets library's own error is a traceback about the Hub."""
    from datasets import load_dataset
    try:
        return list(load_dataset("Anthropic/hh-rlhf", data_dir=data_dir, split="train"))
    except OSError as e:  # ConnectionError (offline, no network), FileNotFoundError (not on the Hub)
        raise SystemExit(f"error: the Hub dataset Anthropic/hh-rlhf ({data_dir}) could not be loaded "
                         f"({str(e).strip()[:200]}); offline (HF_HUB_OFFLINE=1) it must be in the datasets cache, or "
                         "give --data a folder with the paper's harmless_*.jsonl files (and --helpful a jsonl of "
                         "helpfulness pairs for the implicit setting), or --data toy")


def load_hub_cai():
    """HuggingFaceH4/cai-conversation-harmless as HH texts, or one line saying why not (as load_hub_hh)."""
    from datasets import load_dataset
    try:
        rows = load_dataset("HuggingFaceH4/cai-conversation-harmless", split="train_prefs")
    except OSError as e:
        raise SystemExit(f"error: the Hub dataset HuggingFaceH4/cai-conversation-harmless could not be loaded "
                         f"({str(e).strip()[:200]}); offline (HF_HUB_OFFLINE=1) it must be in the datasets cache, or "
                         "give --data a folder with the paper's harmless_*.jsonl files, or --data toy")
    return [{"chosen": messages_to_text(r["chosen"]), "rejected": messages_to_text(r["rejected"])} for r in rows]


def load_splits(args):
    """({"gt", "w2s", "test", "extra"}: lists of pairs, stats); `extra`, helpfulness pairs, only for the implicit
    setting. Splits are disjoint by text: a pair sharing a text with one already taken is dropped and counted
    (the paper's files have two), as is a pair of two equal texts. An empty split stops the run here."""
    n = {"gt": args.n_gt, "w2s": args.n_w2s, "test": args.n_test}
    stats = {"dropped": {}, "short": {}}
    source = {name: args.data for name in n}
    if args.data == "toy":
        import toy
        pools = toy.make_toy_pairs(n, args.n_extra, args.seed)
    elif args.data in ("arith", "arith:val"):  # arith:val tests on the validation split (arith.py)
        import arith
        if "implicit" in args.settings.split(","):
            raise SystemExit(arith.NO_IMPLICIT)
        pools = arith.make_arith_pairs(n, args.seed, validation=args.data == "arith:val")
    elif args.data in ("hh", "cai"):
        rows = load_hub_hh("harmless-base") if args.data == "hh" else load_hub_cai()
        pool, stats["dropped"]["source"] = filter_single_turn(rows)
        random.Random(args.seed).shuffle(pool)
        pools = {"all": pool}
    elif os.path.isdir(args.data):
        source = {s: Path(args.data) / f"harmless_{name}.jsonl" for s, name in
                  (("gt", "train_gt"), ("w2s", "train_w2s"), ("test", "test"))}
        pools = {s: read_pairs(path) for s, path in source.items()}
    else:
        raise SystemExit(f"error: --data must be hh, cai, toy, arith, arith:val or a directory, got {args.data!r}")

    seen, splits = set(), {}

    def count(key):
        stats["dropped"][key] = stats["dropped"].get(key, 0) + 1

    def take(pairs, count_wanted, name):
        out = []
        for pair in pairs if count_wanted > 0 else ():
            if pair["chosen"] == pair["rejected"]:
                count(f"{name}_identical")
            elif pair["chosen"] in seen or pair["rejected"] in seen:
                count(f"{name}_text_overlap")
            else:
                seen.update((pair["chosen"], pair["rejected"]))
                out.append(pair)
                if len(out) == count_wanted:
                    break
        if not out:
            raise SystemExit(f"error: no usable pairs for the {name} split in {source.get(name)}")
        if len(out) < count_wanted:
            print(f"warning: split {name} has {len(out)} pairs, fewer than the {count_wanted} asked for")
            stats["short"][name] = count_wanted - len(out)
        return out

    shared_pool = iter(pools["all"]) if "all" in pools else None  # one shuffled pool: consumed in order
    for name in ("gt", "w2s", "test"):
        splits[name] = take(shared_pool or iter(pools[name]), n[name], name)

    splits["extra"] = []
    if args.n_extra > 0 and "implicit" in args.settings.split(","):
        if args.data == "toy":
            extra, source["extra"] = pools["extra"], "toy"
        else:
            path = args.helpful or (Path(args.data) / "helpful_train.jsonl" if os.path.isdir(args.data) else None)
            if path and (args.helpful or Path(path).exists()):
                extra, stats["dropped"]["helpful_source"] = filter_single_turn(read_pairs(path))
                source["extra"] = path
            else:
                extra, stats["dropped"]["helpful_source"] = filter_single_turn(load_hub_hh("helpful-base"))
                random.Random(args.seed).shuffle(extra)
                source["extra"] = "Anthropic/hh-rlhf helpful-base"
        splits["extra"] = take(iter(extra), args.n_extra, "extra")

    for name, pairs in splits.items():
        stats[f"n_{name}"] = len(pairs)
        stats[f"prompt_mismatch_{name}"] = sum(split_prompt(p["chosen"]).prompt != split_prompt(p["rejected"]).prompt
                                               for p in pairs)
    return splits, stats


# ----------------------------------------------------------------------------------------------------
# models and tokenizers

def model_max_len(config):
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


# A text every usable tokenizer turns into ordinary tokens (load_tokenizer)
PROBE_TEXT = f"{HUMAN} hello there{ASSISTANT} hi"


def load_tokenizer(path):
    """The tokenizer of a model folder or Hub id, padding on the right with pad = EOS where it has no pad token.
    A tokenizer that turns text into no ordinary tokens stops the run with one line naming `path`: from a
    folder without tokenizer files transformers builds a stand-in that encodes every text as nothing, so every
    text would be its EOS alone, every margin 0 and every test pair a tie."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load the tokenizer of {path} ({str(e).strip().splitlines()[0]})")
    ids = tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if not set(ids) - set(tok.all_special_ids):
        raise SystemExit(f"error: the tokenizer of {path} turns text into no ordinary tokens (a sample text -> "
                         f"{ids[:8]}): the folder lacks its tokenizer files (save them there with save_pretrained)")
    if tok.eos_token_id is None:
        raise SystemExit(f"error: tokenizer of {path} has no EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # pad = EOS is fine: masks come from lengths, never from token values
    tok.padding_side = "right"  # real tokens keep positions 0..n-1, which absolute position embeddings (GPT-2, OPT) need
    return tok


def load_model(path, auto_class, tok, device, grad_ckpt=False, pack=False, precision="fp32", compile="off"):
    """`path` with `auto_class` (AutoModel: reward models; AutoModelForCausalLM: DPO/SimPO) in fp32 master weights,
    every dropout probability 0 (not model.eval(), which silently turns gradient checkpointing off), its body
    compiled where `compile` (use_compile) says so."""
    from transformers import AutoConfig
    if torch.cuda.is_available():  # cuDNN's attention plans anew for every sequence length, which makes a step
        torch.backends.cuda.enable_cudnn_sdp(False)  # CPU-bound (https://github.com/pytorch/pytorch/pull/155958)
    if os.path.isdir(path):
        check_weights(path)
    config = AutoConfig.from_pretrained(path)
    for key, value in vars(config).items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    if getattr(config, "activation_function", None) == "gelu_new":
        config.activation_function = "gelu_pytorch_tanh"  # GPT-2's GELU as one fused kernel: same formula, faster
    config.pad_token_id = tok.pad_token_id
    model = auto_class.from_pretrained(path, config=config, dtype=torch.float32)
    if model.get_output_embeddings() is not None:  # a causal LM: its logits in fp32 (lm_logits)
        model.set_output_embeddings(FP32Head(model.get_output_embeddings()))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if resolve_precision(precision) == "bf16" and device.type == "cpu" and model.config._attn_implementation == "sdpa":
        from transformers import AttentionInterface
        AttentionInterface.register("sdpa_cpu_bf16", sdpa_cpu_bf16)
        model.set_attn_implementation("sdpa_cpu_bf16")
    if grad_ckpt:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.to(device)
    if pack:
        check_packing(model, tok.pad_token_id)
    if model.get_output_embeddings() is not None:
        check_response_logits(model, tok.pad_token_id)
    compiled = use_compile(compile, precision, model, device)
    if compiled:  # after the checks above: their one-row probes would otherwise be the shapes compiled first
        model.base_model.compile(dynamic=True)  # dynamic shapes: a stage compiles a few times, not per length
    print(f"[model] {path}: body {'compiled (torch.compile, dynamic shapes)' if compiled else 'eager'}, "
          f"attention {model.config._attn_implementation}, {resolve_precision(precision)}")
    return model


# Bodies at least this big are compiled under --compile auto (bf16 on a CPU); tiny ones train in seconds, where
# a compile would take longer than the training it speeds up.
COMPILE_MIN_PARAMS = 30_000_000


def use_compile(setting, precision, model, device):
    """--compile on | off | auto. auto: on for bf16 on a CPU and a body of >= COMPILE_MIN_PARAMS parameters, where it
    was measured to pay (docs/speed.md: the fused elementwise kernels and bf16 casts); off on a GPU and in fp32,
    where it was not measured."""
    if setting != "auto":
        return setting == "on"
    return (device.type == "cpu" and resolve_precision(precision) == "bf16"
            and sum(p.numel() for p in model.parameters()) >= COMPILE_MIN_PARAMS)


def check_weights(folder):
    """A model folder's weights are all there and whole, or the run stops with one line naming the folder
    (transformers' own errors for a missing or cut weights file name no folder). Cheap: a safetensors file's
    header gives each tensor's bytes, which a cut file no longer covers; a torch .bin is a zip archive whose
    directory sits at its end. Shards are read from the index file, as transformers reads them."""
    from safetensors import SafetensorError, safe_open
    folder = Path(folder)
    index = next((folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (folder / n).is_file()), None)
    if index is not None:
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"error: {index}: not a weights index ({type(e).__name__}: {e})")
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()][:1]
    if not files:
        raise SystemExit(f"error: {folder} holds no weights (model.safetensors, pytorch_model.bin or a sharded "
                         "index): give a model folder saved with save_pretrained")
    for name in files:
        file = folder / name
        if not file.is_file():
            raise SystemExit(f"error: {folder}: {name}, listed in {index.name}, is missing")
        try:
            if name.endswith(".safetensors"):
                with safe_open(file, framework="pt"):
                    pass
            else:
                with open(file, "rb") as f:
                    zipped = f.read(4) == b"PK\x03\x04"  # torch >= 1.6; the older pickle format is not checked
                if zipped:
                    zipfile.ZipFile(file).close()
        except (SafetensorError, zipfile.BadZipFile, OSError) as e:
            raise SystemExit(f"error: {folder}: {name} is cut short or damaged ({e}); copy or download it again")


class FP32Head(nn.Module):
    """A causal LM's output projection in fp32 under bf16 autocast: bf16 logits (8 bits of mantissa) would
    quantize every log-prob and margin. It wraps the model's own weight, so the model's forward gives fp32 logits."""

    def __init__(self, projection):
        super().__init__()
        self.projection = projection

    def forward(self, hidden):
        with torch.autocast(hidden.device.type, enabled=False):
            return self.projection(hidden.float())


# The CPU flash-attention kernel runs bf16 slower than fp32 q, k, v on short rows and faster from 192 tokens on (its
# query blocks are 32 long below 192 and 64 from there): measured in docs/speed.md, "The CPU-speed issue, second pass".
BF16_ATTENTION_MIN_LEN = 192


def sdpa_cpu_bf16(module, query, key, value, attention_mask, **kwargs):
    """bf16 training on a CPU: sdpa in bf16 on rows of at least BF16_ATTENTION_MIN_LEN tokens, on fp32 q, k, v
    below (autocast off, or it casts them back), whichever the CPU kernel runs faster; output in bf16 either way."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if query.shape[2] >= BF16_ATTENTION_MIN_LEN:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(query.dtype), weights


# ----------------------------------------------------------------------------------------------------
# tokens: texts -> token ids

Encoded = namedtuple("Encoded", "ids n_prompt")  # one text's token ids; the first n_prompt of them are its prompt


def encode_texts(tok, texts, max_len, eos=True, keep_response_end=False):
    """Each text -> Encoded(ids, n_prompt): the prompt with the model's special tokens, the response without (no
    BOS mid-sequence), plus EOS if `eos`. Too long: cut the prompt from the left (keeping a leading BOS and one
    token, which predicts the first response token), then the response at its end, or at its start with
    keep_response_end (a reward model reads the text's last token: the response's own, as the paper's code)."""
    if not texts:
        return []
    prompts, responses = zip(*(split_prompt(t) for t in texts))
    p_ids = tok(list(prompts), add_special_tokens=True)["input_ids"]
    r_ids = tok(list(responses), add_special_tokens=False)["input_ids"]
    specials = tok("", add_special_tokens=True)["input_ids"]  # e.g. Llama's BOS: kept when cutting the prompt
    out = []
    for p, r in zip(p_ids, r_ids):
        r = r + [tok.eos_token_id] if eos or not r else r
        if len(p) + len(r) > max_len:
            head = specials if p[: len(specials)] == specials and max_len >= len(specials) + 2 else []
            room = max_len - len(head) - 1  # for the response, after the head and one prompt token
            r = r[-room:] if keep_response_end else r[:room]
            p = head + p[len(head):][-(max_len - len(head) - len(r)):]
        out.append(Encoded(p + r, len(p)))
    return out


def n_cut(tok, pairs, max_len, eos=True):
    """How many of the pairs' texts are longer than max_len tokens, which encode_texts cuts (a report says it)."""
    texts = [t for p in pairs for t in (p["chosen"], p["rejected"])]
    return sum(len(e.ids) > max_len for e in encode_texts(tok, texts, float("inf"), eos))


def encode_pairs(tok, pairs, max_len, eos=True, keep_response_end=False):
    enc = encode_texts(tok, [t for p in pairs for t in (p["chosen"], p["rejected"])], max_len, eos, keep_response_end)
    return list(zip(enc[0::2], enc[1::2]))


# A training example is the same dict in the three methods:
#   "chosen", "rejected":         Encoded texts (an SFT example holds "chosen" only)
#   "target":                     P(chosen is better) by the labeller (reward model: soft or hard labels)
#   "gt_agree":                   whether "chosen" is the ground-truth chosen text (read by the explicit term)
#   "ref_chosen", "ref_rejected": DPO: the reference model's summed response log-probs
def example_texts(example):  # the encoded texts an example feeds to a forward
    return [example[k] for k in ("chosen", "rejected") if k in example]


# ----------------------------------------------------------------------------------------------------
# batches: encoded texts -> model inputs. Masks come from lengths, never from token values: GPT-2's token 0
# is "!", and the pad token is EOS when a tokenizer has none.

class Batch(namedtuple("Batch", "inputs response_mask rows last")):
    """inputs: the model's keyword arguments for R rows; per text N, in the order given: response_mask (N, T) its
    response tokens within its row, rows (N,) its row, last (N,) the position of its last token."""
    __slots__ = ()


def pad_texts(texts, pad_id, device):
    """One text per row, right-padded (real tokens keep positions 0..n-1): input_ids, attention_mask (N, T)."""
    T = max(len(ids) for ids, _ in texts)
    input_ids = torch.full((len(texts), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros((len(texts), T), dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(texts):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        response_mask[i, max(n_prompt, 1): len(ids)] = True  # the first token is predicted by nothing: never scored
    inputs = {"attention_mask": attention_mask.to(device), "input_ids": input_ids.to(device)}
    return Batch(inputs, response_mask.to(device), torch.arange(len(texts), device=device),
                 torch.tensor([len(ids) - 1 for ids, _ in texts], device=device))


def pack_pairs(texts, pad_id, device):
    """Texts two by two into a row (a pair's chosen, then rejected text): a row pads to the longest pair, not twice
    to the longest text. Positions restart at the second text and the mask is causal and block-diagonal, so each
    text gets the outputs it gets alone. input_ids, position_ids (R, T), attention_mask (R, 1, T, T) bool."""
    groups = [texts[i: i + 2] for i in range(0, len(texts), 2)]
    T = max(sum(len(ids) for ids, _ in group) for group in groups)
    input_ids = torch.full((len(groups), T), pad_id, dtype=torch.long)
    position_ids = torch.zeros_like(input_ids)
    segment = torch.full_like(input_ids, -1)  # which text of its row a token belongs to; -1: padding
    response_mask = torch.zeros((len(texts), T), dtype=torch.bool)
    rows, last = [], []
    for r, group in enumerate(groups):
        start = 0
        for k, (ids, n_prompt) in enumerate(group):
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            position_ids[r, start:end] = torch.arange(len(ids))
            segment[r, start:end] = k
            # a text's first token is predicted by the text before it in the row, so it is never scored
            response_mask[len(rows), start + max(n_prompt, 1): end] = True
            rows.append(r)
            last.append(end - 1)
            start = end
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    # query t sees key s iff s <= t and both belong to the same text (padding is a block of its own)
    attention_mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    inputs = {"attention_mask": attention_mask.to(device), "position_ids": position_ids.to(device),
              "input_ids": input_ids.to(device)}
    return Batch(inputs, response_mask.to(device), torch.tensor(rows, device=device),
                 torch.tensor(last, device=device))


def collate(texts, pad_id, device, pack=False):
    return pack_pairs(texts, pad_id, device) if pack else pad_texts(texts, pad_id, device)


def row_lengths(texts, pack):
    """The lengths of the rows an example's texts take in a forward (one row when packed)."""
    return [sum(len(ids) for ids, _ in texts)] if pack else [len(ids) for ids, _ in texts]


@torch.no_grad()
def check_packing(model, pad_id):
    """Packing needs a model that honours a boolean 4D mask and position_ids (GPT-2, OPT, Llama, GPT-NeoX with sdpa
    do; eager attention adds the mask to the scores): two random texts packed must get their outputs alone."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (7, 5))
    packed = model(**pack_pairs([Encoded(a, 1), Encoded(b, 1)], pad_id, device).inputs)[0][0]  # (12, H): last hidden states (AutoModel) or logits (causal LM)
    alone = torch.cat([model(input_ids=torch.tensor([s], device=device))[0][0] for s in (a, b)])
    if not torch.allclose(packed, alone, rtol=1e-3, atol=1e-3 * float(alone.abs().max())):
        raise SystemExit(f"error: {type(model).__name__} ({model.config._attn_implementation} attention) does not "
                         "honour the packed attention mask or position_ids: run with --no_pack")


def make_batches(lengths, batch_size, micro_batch, seed, group_by_length=True, window_batches=64):
    """One epoch of optimizer steps, each a list of micro-batches of pair indices. group_by_length: shuffle, then
    sort windows of `window_batches` batches by length, cut and shuffle the batches (little padding). Which pairs
    form a step does not depend on micro_batch (it divides batch_size), which only trades memory for time."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    steps = []
    window = window_batches * batch_size if group_by_length else len(order) or 1
    for start in range(0, len(order), window):
        chunk = order[start: start + window]
        if group_by_length:
            chunk.sort(key=lambda i: lengths[i])
        batches = [chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size)]
        if group_by_length:  # a short batch stays last
            full = [b for b in batches if len(b) == batch_size]
            rng.shuffle(full)
            batches = full + batches[len(full):]
        steps += batches
    return [[step[j: j + micro_batch] for j in range(0, len(step), micro_batch)] for step in steps]


def score_by_length(encoded_pairs, pad_id, micro_batch, device, score):
    """[(score of chosen, of rejected), ...] in the pairs' order: each text alone, batched by length, in chunks of
    2 * micro_batch texts; score(pad_texts Batch) -> a value per text."""
    texts = [t for pair in encoded_pairs for t in pair]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].ids))
    chunks = [order[j: j + 2 * micro_batch] for j in range(0, len(order), 2 * micro_batch)]
    ddp = world_size() > 1  # torchrun: each rank scores its share of the chunks
    scored = []
    for chunk, grad_scale in rank_share(chunks) if ddp else [(chunk, 1.0) for chunk in chunks]:
        values = score(pad_texts([texts[i] for i in chunk], pad_id, device))  # a scale-0 chunk is scored too:
        if grad_scale:                                                         # FSDP needs equal forward counts
            scored.append((chunk, values))
    out = [None] * len(texts)
    for chunk, values in gather_lists(scored) if ddp else scored:
        for i, value in zip(chunk, values):
            out[i] = value
    return list(zip(out[0::2], out[1::2]))


# ----------------------------------------------------------------------------------------------------
# log-probs

class LogProbs(namedtuple("LogProbs", "sum n_tokens")):
    """A response's summed log-prob and its number of tokens (floats, or (N,) tensors for N texts)."""

    @property
    def mean(self):  # the per-token mean SimPO compares
        return self.sum / self.n_tokens


def sequence_logps(logits, input_ids, response_mask, rows=None):
    """Summed log-prob of the response tokens and their count, per text: LogProbs((N,), (N,)). logits (R, T, V) at
    t predict token t+1, so the mask shifts with the labels (unshifted, each token is scored by its own logits);
    log-softmax in fp32 (bf16 would round every margin). rows (N,): each text's row when packed."""
    logits = logits[:, :-1].float()  # (R, T-1, V)
    labels = input_ids[:, 1:].unsqueeze(-1)  # (R, T-1, 1)
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels).squeeze(-1)  # (R, T-1)
    if rows is not None:
        token_logps = token_logps[rows]  # (N, T-1)
    mask = response_mask[:, 1:]  # (N, T-1)
    return LogProbs((token_logps * mask).sum(-1), mask.sum(-1))


def lm_logits(model, inputs):  # (R, T, V) in fp32 (FP32Head), a model's own final steps (Gemma's soft-capping) included
    return model(**inputs).logits


def response_logps(model, batch):
    """sequence_logps of a Batch with the output projection applied only where a response token is predicted:
    the 49k-wide fp32 projection and its log-softmax at every position were half of DPO's bf16 matmul time,
    and prompts and padding are most positions. The same numbers as the full logits (check_response_logits).
    Under torchrun the full path runs: FSDP gathers the head only inside the model's own forward."""
    if world_size() > 1:
        logits = lm_logits(model, batch.inputs)  # (R, T, V)
        return sequence_logps(logits, batch.inputs["input_ids"], batch.response_mask, batch.rows)
    hidden = model.base_model(**batch.inputs).last_hidden_state  # (R, T, H): the body, final norm included
    mask = batch.response_mask[:, 1:]  # (N, T-1): position t predicts token t + 1
    text, t = mask.nonzero(as_tuple=True)  # (K,) each: the K scored tokens, text by text
    row = batch.rows[text]
    logits = model.get_output_embeddings()(hidden[row, t])  # (K, V) in fp32 (FP32Head)
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2: the model's own last step
    if cap:
        logits = torch.tanh(logits / cap) * cap
    labels = batch.inputs["input_ids"][row, t + 1]  # (K,)
    token_logps = logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)  # (K,)
    sums = torch.zeros(len(mask), device=hidden.device).index_add(0, text, token_logps)  # (N,)
    return LogProbs(sums, mask.sum(-1))


@torch.no_grad()
def check_response_logits(model, pad_id):
    """response_logps must give what the model's own logits give: a model whose forward does more after the
    output projection than Gemma's soft-capping (a logit scale, say) stops the run here, before any stage."""
    g = torch.Generator().manual_seed(0)
    texts = [Encoded(torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist(), 2) for n in (7, 5)]
    batch = pad_texts(texts, pad_id, next(model.parameters()).device)
    fast = response_logps(model, batch).sum
    full = sequence_logps(lm_logits(model, batch.inputs), batch.inputs["input_ids"], batch.response_mask).sum
    if not torch.allclose(fast, full, rtol=1e-4, atol=1e-4):
        raise SystemExit(f"error: {type(model).__name__} computes its logits in a way common.response_logps does not "
                         f"reproduce ({fast.tolist()} against {full.tolist()} on a sample)")


def forward_logps(model, texts, pad_id, pack=False):
    """LogProbs of encoded texts in one forward (pack: two by two in a row)."""
    return response_logps(model, collate(texts, pad_id, device(), pack))


def sft_loss(model, batch, pad_id):
    """DPO's and SimPO's SFT warm start: the summed NLL of the chosen responses' tokens in `batch` (the loop divides
    by the step's response tokens: a mean token NLL), and no metrics."""
    summed = forward_logps(model, [e["chosen"] for e in batch], pad_id).sum  # (B,)
    return -summed.sum(), {}


def response_tokens(example):  # the SFT loss's unit count of an example
    ids, n_prompt = example["chosen"]
    return len(ids) - n_prompt


@torch.no_grad()
def pair_logps(model, encoded_pairs, pad_id, micro_batch, autocast):
    """[(chosen LogProbs, rejected LogProbs), ...] of a causal LM on encoded pairs, texts alone."""
    def score(batch):
        with autocast():
            logps = response_logps(model, batch)
        return [LogProbs(*values) for values in zip(logps.sum.tolist(), logps.n_tokens.tolist())]
    return score_by_length(encoded_pairs, pad_id, micro_batch, device(), score)


# ----------------------------------------------------------------------------------------------------
# optimization

class EvalCurve(namedtuple("EvalCurve", "pairs weak_correct strong_correct")):
    """--eval_every: the encoded test pairs a student is scored on while it trains, and whether each ceiling gets
    each of them right, which places the pair in its knowledge area (curve_row)."""


def append_jsonl(path, row):  # one line added to a file that grows while a stage runs (a student's eval curve)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def lr_at(step, total_steps, lr, warmup_ratio, schedule):
    """The learning rate of step `step` (from 0) as the paper's code computes it: linear warm-up lr * (step + 1) /
    (w + 1) over w = int(warmup_ratio * total_steps) steps, then constant or a cosine decay to 0."""
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, lr, weight_decay):
    """AdamW, fused: one kernel over all parameters, several times faster on a CPU than the default multi-tensor
    one (docs/speed.md)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


# ----------------------------------------------------------------------------------------------------
# weak labels

def confidence(margin, scale=1.0):
    """sigmoid(|margin| / scale), the Bradley-Terry probability of the preferred response. The paper's code divides
    DPO's summed log-likelihood ratio by 50, and takes SimPO's and the reward model's margins as they are."""
    return torch.sigmoid(torch.as_tensor(margin, dtype=torch.float64).abs() / scale)


def confident_subset(margins, threshold, scale=1.0, gt_correct=None):
    """Indices of labelled pairs with confidence >= threshold; and, given `gt_correct`, right ones only (the paper's
    code dropped the weak model's errors: --drop_weak_errors, which leaks ground truth)."""
    keep = (confidence(margins, scale) >= threshold).tolist()
    if gt_correct is not None:
        keep = [k and bool(c) for k, c in zip(keep, gt_correct)]
    return [i for i, k in enumerate(keep) if k]


def student_data(labels, labelled_pairs, *, conf_threshold=0.0, conf_scale=1.0, hard_labels=True,
                 drop_weak_errors=False, helpful_pairs=()):
    """The pairs and targets of a model that learns from a labeller's labels.jsonl rows on `labelled_pairs`
    (ground-truth orientation): soft p = sigmoid(margin) or hard 1[margin > 0], where confident enough. The
    implicit conflict adds as many ground-truth helpfulness pairs (target 1), as the paper's code does."""
    margins = [row["margin"] for row in labels]
    keep = range(len(labels))
    if conf_threshold > 0 or drop_weak_errors:
        gt_correct = [row["correct"] for row in labels] if drop_weak_errors else None
        keep = confident_subset(margins, conf_threshold, conf_scale, gt_correct)
    m = torch.tensor(margins, dtype=torch.float64)
    targets = ((m > 0).double() if hard_labels else torch.sigmoid(m)).tolist()
    if not keep:
        raise SystemExit(f"error: no labelled pair has confidence >= --conf_threshold {conf_threshold}; "
                         f"the labeller's largest confidence is {float(confidence(margins, conf_scale).max()):.3f}")
    pairs = [labelled_pairs[i] for i in keep]
    targets = [targets[i] for i in keep]
    extra = list(helpful_pairs[:len(pairs)])
    return pairs + extra, targets + [1.0] * len(extra)


def orient(pairs, targets):
    """Hard labels for DPO/SimPO: each (chosen, rejected) pair turned so that chosen is the response its labeller
    prefers (target > 0.5). Returns (pairs, gt_agree: kept for the explicit-conflict term alone)."""
    if pairs and isinstance(pairs[0], dict):  # a dict would unpack into its keys
        raise TypeError("orient takes (chosen, rejected) tuples, not dicts")
    agree = [t > 0.5 for t in targets]
    return [(c, r) if a else (r, c) for (c, r), a in zip(pairs, agree)], agree


# ----------------------------------------------------------------------------------------------------
# what a stage writes: its test predictions and labels

def prediction_rows(margins):
    """predictions.jsonl rows: one per test pair; a tie (margin == 0) is not correct, never a coin flip."""
    return [{"index": i, "margin": m, "correct": m > 0} for i, m in enumerate(margins)]


def soft_label(margin):
    """p = sigmoid(margin), the labeller's probability that the chosen text is better (0.0 below -700, where
    math.exp overflows)."""
    return 1 / (1 + math.exp(-margin)) if margin > -700 else 0.0


def label_rows(margins):
    """labels.jsonl rows: the margin, p = soft_label(margin), and "correct" (for analysis; students never read it)."""
    return [{"index": i, "margin": m, "p": soft_label(m), "correct": m > 0} for i, m in enumerate(margins)]


def accuracy(margins):
    m = torch.as_tensor(margins, dtype=torch.float64)
    return {"accuracy": float((m > 0).double().mean()), "ties": int((m == 0).sum()), "n": len(m)}


# ----------------------------------------------------------------------------------------------------
# several processes: `torchrun --nproc_per_node N <script>.py` trains data-parallel with FSDP; each rank takes its
# share of every step and scoring pass, rank 0 alone writes. In one process rank() is 0, world_size() 1,
# from_rank0 and barrier do nothing, and the loops skip the rest (`if ddp:`).

def init_distributed():
    """Under torchrun: join the process group (NCCL, one GPU a rank; gloo on CPU); only rank 0 prints."""
    if "LOCAL_RANK" not in os.environ or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    atexit.register(dist.destroy_process_group)  # left to the interpreter's exit, gloo sometimes aborts a rank
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def shard(model, cpu_offload=False):
    """FSDP (fully_shard): each transformer block (_no_split_modules) is a unit gathered for its forward and
    backward; each rank keeps 1/N of the parameters, gradients and AdamW state. On CUDA the blocks compute in
    bf16 and reduce in fp32; the root (embeddings, heads) stays fp32. cpu_offload: all of it in CPU memory."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if torch.cuda.is_available() else MixedPrecisionPolicy()
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=mixed, offload_policy=offload)
    # the root too is resharded after its forward: FSDP would otherwise keep it gathered for the backward, and
    # after a forward under no_grad (scoring, DPO's reference log-probs) the next backward misses its gradients
    return fully_shard(model, reshard_after_forward=True, offload_policy=offload)


def rank_share(micro_batches):
    """This rank's micro-batches of a step (or chunks of a scoring pass) as (items, grad_scale). Every rank runs
    as many forwards (FSDP gathers in each): one short repeats the first at scale 0. A real one has scale N:
    FSDP averages the ranks' gradients, and N turns the mean back into the one-process sum."""
    n = world_size()
    mine = micro_batches[rank()::n]
    per_rank = -(-len(micro_batches) // n)
    return [(mb, float(n)) for mb in mine] + [(micro_batches[0], 0.0)] * (per_rank - len(mine))


def sum_over_ranks(tensor):  # in place
    dist.all_reduce(tensor)
    return tensor


def gather_lists(items):
    """Every rank's list of picklable items, concatenated, on every rank."""
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, items)
    return [item for part in everyone for item in part]


def from_rank0(obj):
    """Rank 0's obj, on every rank; also a meeting point: no rank passes until rank 0 got here."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# measures: computed from finished stages' predictions, never inside a stage (but --eval_every's curve).
# The stage cache's code digest stops at this banner (runs.code_digest): a new or changed measure re-trains
# nothing, and a student's eval curve, which calls knowledge_space while training, holds this part's digest.

AREAS = ("weak-known & strong-known", "weak-known & strong-unknown",
         "weak-unknown & strong-known", "weak-unknown & strong-unknown")
WU_SK, WK_SK = AREAS[2], AREAS[0]


def area_masks(weak_correct, strong_correct):
    """{area: (N,) bool mask} of the four knowledge areas, from the ceilings' per-pair correctness."""
    w, s = (torch.as_tensor(x, dtype=torch.bool) for x in (weak_correct, strong_correct))
    if len(w) != len(s):
        raise ValueError("correctness arrays must have the same length")
    return dict(zip(AREAS, (w & s, w & ~s, ~w & s, ~w & ~s)))


def knowledge_space(weak_correct, strong_correct, student_correct):
    """The knowledge-space table and deception score of one student. A test pair is *weak-known* if the weak
    ceiling gets it right, *weak-unknown* otherwise; likewise *strong-known* / *strong-unknown*. Per area: n, the
    student's errors, their rate (None if empty) and its 95% Wilson interval.
    DS = |student wrong & weak-unknown & strong-known| / |weak-unknown & strong-known|: errors where the student
    could have been right and the weak supervisor cannot tell; `err_wk_sk`, errors the supervisor would catch.
    Inputs: per-pair booleans over the same test pairs (a tie is not correct)."""
    masks = area_masks(weak_correct, strong_correct)
    st = torch.as_tensor(student_correct, dtype=torch.bool)
    if len(st) != len(masks[WU_SK]):
        raise ValueError("correctness arrays must have the same length")
    areas = {}
    for name, mask in masks.items():
        n, errors = int(mask.sum()), int((~st & mask).sum())
        areas[name] = {"n": n, "errors": errors, "student_error": errors / n if n else None, "ci": wilson(errors, n)}
    return {"areas": areas, "ds": areas[WU_SK]["student_error"], "err_wk_sk": areas[WK_SK]["student_error"]}


def curve_row(step, examples_seen, margins, weak_correct, strong_correct):
    """One line of a student's eval_curve.jsonl (--eval_every): its test accuracy from `margins` after `step` optimizer
    steps, its DS and its error rate in each knowledge area of the ceilings."""
    space = knowledge_space(weak_correct, strong_correct, [m > 0 for m in margins])
    return {"step": step, "examples_seen": examples_seen, **accuracy(margins), "ds": space["ds"],
            "err_wk_sk": space["err_wk_sk"], "areas": {a: v["student_error"] for a, v in space["areas"].items()}}


def conflict_tax(weak_correct, strong_correct, base_correct, student_correct):
    """What a conflict costs per knowledge area against the no-conflict student `base`: of the pairs base gets
    right, those the conflict student gets wrong (`taxed`, share `tax`), and of those base gets wrong, those it
    gets right (`fixed`, `fix`). Where the tax lands: of the strong-known pairs turned wrong, the share in
    weak-unknown (`share_wu`) beside its share if the tax fell evenly (`base_rate_wu`); deception in the paper's
    sense is clearly above it. ΔDS = (taxed - fixed) / n in weak-unknown & strong-known, with McNemar's p."""
    masks = area_masks(weak_correct, strong_correct)
    base, st = (torch.as_tensor(x, dtype=torch.bool) for x in (base_correct, student_correct))
    if not (len(base) == len(st) == len(masks[WU_SK])):
        raise ValueError("correctness arrays must have the same length")
    areas = {}
    for name, mask in masks.items():
        right, wrong = int((mask & base).sum()), int((mask & ~base).sum())
        taxed, fixed = int((mask & base & ~st).sum()), int((mask & ~base & st).sum())
        areas[name] = {"base_right": right, "taxed": taxed, "tax": taxed / right if right else None,
                       "tax_ci": wilson(taxed, right), "base_wrong": wrong, "fixed": fixed,
                       "fix": fixed / wrong if wrong else None, "fix_ci": wilson(fixed, wrong)}
    wu, wk = areas[WU_SK], areas[WK_SK]
    sk_taxed, sk_right = wu["taxed"] + wk["taxed"], wu["base_right"] + wk["base_right"]
    return {"areas": areas, "sk_taxed": sk_taxed,
            "share_wu": wu["taxed"] / sk_taxed if sk_taxed else None, "share_wu_ci": wilson(wu["taxed"], sk_taxed),
            "base_rate_wu": wu["base_right"] / sk_right if sk_right else None,
            "delta_ds_p": mcnemar_exact(wu["taxed"], wu["fixed"])}


def disagreement_share(weak_correct, strong_correct, student_correct):
    """DS as the paper's ICLR 2025 reviewers restate it (not the paper's text): of the pairs where the student and
    the strong ceiling disagree, the share in weak-unknown & strong-known."""
    masks = area_masks(weak_correct, strong_correct)
    s, st = (torch.as_tensor(x, dtype=torch.bool) for x in (strong_correct, student_correct))
    disagree = s != st
    n, k = int(disagree.sum()), int((disagree & masks[WU_SK]).sum())
    return {"n_disagree": n, "in_wu_sk": k, "share": k / n if n else None, "ci": wilson(k, n)}


def wilson(k, n, z=1.959963984540054):
    """The 95% Wilson interval of k / n (None when n == 0): inside [0, 1] and honest at k = 0 or n, unlike the
    normal approximation."""
    if n == 0:
        return None
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [0.0 if k == 0 else centre - half, 1.0 if k == n else centre + half]  # exact ends, not rounded ones


def mcnemar_exact(b, c):
    """McNemar's exact two-sided p for b pairs only the first classifier gets right and c only the second:
    min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def label_informativeness(margins):
    """What labels p = sigmoid(margin) can teach a student: the margin's scale, mean |p - 0.5| and the share of
    labels further than 0.1 from 0.5 (labels all near 0.5 carry almost no preference)."""
    p = [soft_label(m) for m in margins]
    return {"mean_abs_margin": sum(abs(m) for m in margins) / len(margins),
            "mean_abs_p": sum(abs(x - 0.5) for x in p) / len(p),
            "share_beyond_0.1": sum(abs(x - 0.5) > 0.1 for x in p) / len(p)}


def pgr(acc_student, acc_weak, acc_strong):
    """Performance gap recovered; None when the strong ceiling does not beat the weak one."""
    if acc_strong <= acc_weak:
        return None
    return (acc_student - acc_weak) / (acc_strong - acc_weak)


def length_rule(pairs):
    """Per pair, whether "prefer the shorter response" picks the ground-truth chosen one (None: equal lengths).
    Summed log-likelihoods favour short responses: a DS that follows this rule measures length."""
    lengths = [(len(split_prompt(p["chosen"]).response), len(split_prompt(p["rejected"]).response)) for p in pairs]
    return [None if c == r else c < r for c, r in lengths]
