"""Shared by every test file: one torch thread, and the tiny local models of the unit tests.

On the 2-core CI box torch's default intra-op threads made tiny models ~50x slower (0.45 s against 0.006 s
per forward+backward), and test_real.py took 227 s with two threads against 66 s with one, another job beside
it (measured); results agree up to float rounding.

Models: tiny random-init GPT-2 / Llama / OPT / GPT-NeoX bodies with a BPE tokenizer trained on a few sentences
(CORPUS), built locally and saved like Hub models (fixtures tiny, tiny_llama, tiny_opt, tiny_neox); the helpers
below load them as the scripts do. Test files import the helpers and constants (`from conftest import ...`; the
top-level test_losses.py: `from tests.conftest import ...`).
"""
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the method scripts, common.py and tools/: one folder up
import common  # noqa: E402
import rm_w2s  # noqa: E402
import toy  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CPU = torch.device("cpu")


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


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A 1-layer GPT-2 body saved like a Hub model (no pad token: load_tokenizer makes pad = EOS)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    return save_tiny(tmp_path_factory, "tiny-gpt2", lambda tok: GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tok), n_layer=1, n_embd=32, n_head=1, n_positions=128,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 1-layer Llama body (rotary positions) with a BOS-adding tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return save_tiny(tmp_path_factory, "tiny-llama", lambda tok: LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)), bos=True)


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory):
    """A 1-layer OPT body (learned positions with an offset of 2, a BOS-adding tokenizer): the paper's family."""
    from transformers import OPTConfig, OPTForCausalLM
    return save_tiny(tmp_path_factory, "tiny-opt", lambda tok: OPTForCausalLM(OPTConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
        max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)), bos=True)


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory):
    """A 1-layer GPT-NeoX body (Pythia's architecture: partial rotary positions)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return save_tiny(tmp_path_factory, "tiny-neox", lambda tok: GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)))


def reward_model(path, pad_token=None):
    """A reward model over the tiny body at `path`, with a random head: the zero head a run starts from (the
    paper's) gives every text the reward 0, which would make the padding, packing and accumulation checks of
    the tests hold trivially."""
    from transformers import AutoModel
    tok = common.load_tokenizer(path)
    if pad_token is not None:
        tok.pad_token = pad_token
    torch.manual_seed(0)
    model = rm_w2s.RewardModel(common.load_model(path, AutoModel, tok, CPU))
    torch.nn.init.normal_(model.head.weight, std=model.head.weight.shape[1] ** -0.5)
    return tok, model


def rewards_of(model, seqs, pad_id, pack=False):
    """A reward model's rewards of encoded texts in one forward, as rm_w2s.preference_loss computes them."""
    inputs, _, rows, last = common.collate(seqs, pad_id, CPU, pack)
    return model(inputs, rows, last)


def causal_lm(path):
    """The tiny causal LM at `path` as DPO and SimPO load it (fp32 logits, dropout 0), and its tokenizer."""
    tok = common.load_tokenizer(path)
    torch.manual_seed(0)
    return tok, common.load_model(path, AutoModelForCausalLM, tok, CPU)


def encoded_examples(tok, n, seed=0):
    """n encoded pairs from CORPUS with soft targets, in ground-truth orientation (as rm_w2s.train_preferences
    builds them)."""
    rng = random.Random(seed)
    texts = list(dict.fromkeys(CORPUS))
    out = []
    for i in range(n):
        c, r = rng.sample(texts, 2)
        (ec, er), = common.encode_pairs(tok, [{"chosen": c, "rejected": r}], 128)
        out.append({"chosen": ec, "rejected": er, "target": rng.random(), "chosen_first": i % 2 == 0})
    return out


# texts of very different prompt and response lengths, two with "!" (GPT-2's token 0)
PO_TEXTS = [
    "\n\nHuman: Hi!\n\nAssistant: No!",
    "\n\nHuman: " + "Tell me a joke, please! " * 4 + "\n\nAssistant: Why did the chicken cross the road?",
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital of France. Try reading a classic "
    "novel, like Pride and Prejudice.",
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour.",
]
