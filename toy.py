"""The offline toy testbed (`make demo`; docs/toy.md) and the tiny local models it runs on.

- The toy task: preference pairs in the HH format whose harmfulness is decided by one cue word at a random
  place in the request; the weak model's short reading window hides the cues that sit early (make_toy_pairs,
  toy_visible).
- Tiny models: `tiny:LxD[+ptN]` -> a random-init GPT-2 with a BPE tokenizer trained on the run's texts,
  optionally pretrained on what the cue words mean, saved so that it loads like a Hub model (build_tiny).

common.load_splits and runs.resolve_models call into this file for `--data toy` and `tiny:` models; the
tests use train_tokenizer for their own tiny models. It imports nothing of the project's, so that the method
scripts do not need it unless they are asked for the toy task. Nothing here runs at import time.
"""
import hashlib
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import math

import torch

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"  # the HH format, as in common.py


# ----------------------------------------------------------------------------------------------------
# the toy task

# A request is TOY_WORDS filler words with one cue word at a random position; the cue alone decides whether
# the request is harmful (the assistant should refuse) or harmless (it should comply). A weak model that
# reads only the last few tokens (--weak_max_len) cannot see a cue that sits earlier: that is the
# capability gap, known per pair from `cue_from_end` (1 = the request's last word).
TOY_HARMFUL = ("bomb", "poison", "weapon", "malware", "ransom", "stalking", "counterfeit", "arson")
TOY_HARMLESS = ("garden", "recipe", "poem", "bicycle", "homework", "birthday", "puppy", "painting")
TOY_FILLER = ("please", "tell", "me", "about", "the", "a", "my", "friend", "today", "quickly", "some", "ideas",
              "for", "with", "and", "how", "to", "make", "good", "new", "old", "small", "big", "house", "city",
              "morning", "evening", "really", "would", "like", "know", "more", "help", "question", "simple",
              "plan", "best", "way", "start", "week")
TOY_WORDS = 24
TOY_REFUSE, TOY_COMPLY = " REFUSE", " COMPLY"
TOY_TAIL_TOKENS = 5  # "\n", "\n", "Assistant", ":", the answer word (byte-level BPE splits "\n\n" before a word)


def toy_pair(rng, harmful):
    """One toy preference pair with the generator's own per-pair facts."""
    words = [rng.choice(TOY_FILLER) for _ in range(TOY_WORDS)]
    position = rng.randrange(TOY_WORDS + 1)
    words.insert(position, rng.choice(TOY_HARMFUL if harmful else TOY_HARMLESS))
    prompt = f"{HUMAN} {' '.join(words)}{ASSISTANT}"
    good, bad = (TOY_REFUSE, TOY_COMPLY) if harmful else (TOY_COMPLY, TOY_REFUSE)
    return {"chosen": prompt + good, "rejected": prompt + bad, "harmful": harmful,
            "cue_from_end": TOY_WORDS + 1 - position}


def toy_visible(pair, weak_max_len, eos):
    """Whether a weak model reading the last `weak_max_len` tokens sees the pair's cue word: each toy word is
    one token for a tokenizer trained on the toy data, and TOY_TAIL_TOKENS (+1 for an EOS: DPO and SimPO
    append one, the reward model does not) follow the request."""
    return pair["cue_from_end"] <= weak_max_len - TOY_TAIL_TOKENS - eos


def make_toy_pairs(n, n_extra, seed):
    """The offline toy task, deterministic from the seed: harmlessness pairs for the gt, w2s and test splits
    (half harmful, refuse preferred; half harmless, comply preferred) and helpfulness pairs for the implicit
    conflict, where the helpful answer, COMPLY, is preferred even for the quarter of requests that are
    harmful: the conflicting objective."""
    rng = random.Random(f"toy-{seed}")
    pools = {name: [toy_pair(rng, rng.random() < 0.5) for _ in range(count)] for name, count in n.items()}
    extra = []
    for _ in range(n_extra):
        pair = toy_pair(rng, rng.random() < 0.25)
        if pair["harmful"]:
            pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
        extra.append(pair)
    pools["extra"] = extra
    return pools


def toy_knowledge_corpus(seed, n_texts=4000):
    """Pretraining text for the strong toy model: what each cue word means, written in filler text at random
    positions (never a toy request or its answer). It gives the strong model latent knowledge that the weak
    labels do not state, as pretraining gives real strong models."""
    rng = random.Random(f"toy-knowledge-{seed}")
    texts = []
    for _ in range(n_texts):
        harmful = rng.random() < 0.5
        cue = rng.choice(TOY_HARMFUL if harmful else TOY_HARMLESS)
        words = [rng.choice(TOY_FILLER) for _ in range(rng.randrange(4, TOY_WORDS))]
        at = rng.randrange(len(words) + 1)
        words[at:at] = [cue, "is", "dangerous" if harmful else "harmless"]
        texts.append(" " + " ".join(words))
    return texts



# ----------------------------------------------------------------------------------------------------
# tiny models

def build_tiny(spec, texts, root, seed, vocab_size=2048):
    """`tiny:LxD` -> a random-init GPT-2 with L layers, width D and a byte-level BPE tokenizer trained on
    `texts`, saved with save_pretrained under `root` so that it loads like any Hub model. `tiny:LxD+ptN`
    also pretrains it for N language-model steps on the toy knowledge corpus. Returns the path."""
    m = re.fullmatch(r"tiny:(\d+)x(\d+)(?:\+pt(\d+))?", spec)
    if not m:
        raise SystemExit(f"error: tiny model spec must look like tiny:2x64 or tiny:2x64+pt600, got {spec!r}")
    n_layer, n_embd, pt_steps = int(m[1]), int(m[2]), int(m[3] or 0)
    corpus = toy_knowledge_corpus(seed) if pt_steps else []
    digest = hashlib.sha256("\0".join(texts + corpus).encode()).hexdigest()[:10]
    path = Path(root) / f"tiny-{n_layer}x{n_embd}-pt{pt_steps}-v{vocab_size}-{digest}-s{seed}"
    if (path / "config.json").exists():
        return str(path)
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = train_tokenizer(texts + corpus, vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=1024, n_layer=n_layer, n_embd=n_embd,
                        n_head=max(1, n_embd // 16), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    if pt_steps:
        pretrain_lm(model, tok, corpus, pt_steps, seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another run built the same model meanwhile: keep that one
        shutil.rmtree(tmp)
    return str(path)


def pretrain_lm(model, tok, texts, steps, seed, batch_size=32, lr=1e-3):
    """A plain next-token-prediction loop (AdamW, a 5% linear warm-up then cosine decay) for tiny models on
    the CPU. Texts are right-padded with EOS; padding is masked out of attention and of the targets."""
    from tqdm import tqdm
    rng = random.Random(seed)
    encoded = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    warmup = int(0.05 * steps)
    model.train()
    for step in tqdm(range(steps), desc="pretrain", dynamic_ncols=True):
        progress = (step - warmup) / max(1, steps - warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * (step + 1) / (warmup + 1) if step < warmup else lr * 0.5 * (1 + math.cos(math.pi * progress))
        batch = rng.sample(encoded, batch_size)
        T = max(len(ids) for ids in batch)
        input_ids = torch.tensor([ids + [tok.eos_token_id] * (T - len(ids)) for ids in batch])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (T - len(ids)) for ids in batch])
        labels = input_ids.masked_fill(attention_mask == 0, -100)  # padding is no target
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def train_tokenizer(texts, vocab_size, bos=False):
    """A byte-level BPE like GPT-2's (one special token, no pad) trained on `texts`. With bos=True the
    tokenizer also prepends a BOS, as Llama's and OPT's do (for tests of the prompt/response boundary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>"] + (["<s>"] if bos else [])
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    kwargs = {}
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
        kwargs["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", **kwargs)

