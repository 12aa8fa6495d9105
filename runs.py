"""What makes a run safe, resumable and readable, used by each method's main(): options, run folders, the stage
cache, files written whole, the report. Nothing here changes a number the experiment computes (stage keys hold
the code of the method script and of common.py, not of this file), and nothing runs at import time.
Sections: options, models, run folders, stages, digests, health, files, report.
"""
import collections
import dataclasses
import errno
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import common
from common import barrier, from_rank0, rank

# ----------------------------------------------------------------------------------------------------
# options

def parse_args(cls, argv=None):
    """`--key value`, `--key=value`, `--flag [true|false]` and `--no_flag` into the dataclass `cls`; an unknown key
    or a value of the wrong type is one line. Hand-written: argparse reads a value such as `-1e-6` as an option,
    and HfArgumentParser wants help texts as field metadata instead of the comment beside each field."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print_help(cls)
        raise SystemExit(0)
    types = {f.name: {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)
             for f in dataclasses.fields(cls)}
    values, i = {}, 0
    while i < len(argv):
        key, eq, value = argv[i].partition("=")
        name = key[2:].replace("-", "_")
        if not key.startswith("--"):
            raise SystemExit(f"error: expected --key, got {argv[i]!r}")
        if name.startswith("no_") and types.get(name[3:]) is bool:
            values[name[3:]] = False
        elif name not in types:
            raise SystemExit(f"error: unknown argument --{name}; known: {', '.join('--' + k for k in types)}")
        elif types[name] is bool:
            if not eq and argv[i + 1: i + 2] and argv[i + 1].lower() in ("true", "false", "1", "0"):
                i, value = i + 1, argv[i + 1]
            values[name] = value.lower() in ("1", "true", "yes") if value else True
        else:
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"error: --{name} needs a value")
                i, value = i + 1, argv[i + 1]
            try:
                values[name] = types[name](value)
            except ValueError:
                raise SystemExit(f"error: --{name} expects {types[name].__name__}, got {value!r}")
        i += 1
    return cls(**values)


def print_help(cls):
    """Every option of `cls` with its default and the comment beside it in the source."""
    comments = dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    print("options (--key value; a bool is set by --key and unset by --no_key):")
    for f in dataclasses.fields(cls):
        print(f"  --{f.name:<18} {f.default!r:<28} {comments.get(f.name, '')}")


def check_args(args):
    """Every option in range before anything loads: one line naming the option and what it allows. Fields a
    method does not have (beta for the reward model, say) are skipped."""
    finite = math.isfinite
    rules = [  # (option, test, allowed)
        ("n_gt", lambda v: v >= 1, ">= 1"), ("n_w2s", lambda v: v >= 1, ">= 1"), ("n_test", lambda v: v >= 1, ">= 1"),
        ("n_extra", lambda v: v >= 0, ">= 0"),
        ("max_len", lambda v: v >= 3, ">= 3 (a BOS, one prompt and one response token)"),
        ("weak_max_len", lambda v: v == 0 or v >= 3, "0 (same as --max_len) or >= 3"),
        ("lr", lambda v: finite(v) and v > 0, "a finite number > 0"),
        ("sft_lr", lambda v: finite(v) and v >= 0, "a finite number >= 0 (0: the same as --lr)"),
        ("head_lr", lambda v: finite(v) and v >= 0, "a finite number >= 0 (0: the same as --lr)"),
        ("batch_size", lambda v: v >= 1, ">= 1"), ("micro_batch", lambda v: v >= 1, ">= 1"),
        ("epochs", lambda v: v >= 1, ">= 1"), ("sft_epochs", lambda v: v >= 0, ">= 0"),
        ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("weight_decay", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("grad_clip", lambda v: finite(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
        ("alpha", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("beta", lambda v: finite(v) and v > 0, "a finite number > 0"),
        ("gamma", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("conf_threshold", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("conf_scale", lambda v: finite(v) and v > 0, "a finite number > 0"),
        ("log_every", lambda v: v >= 1, ">= 1"), ("eval_every", lambda v: v >= 0, ">= 0 (0: off)"),
        ("student_seed", lambda v: v >= -1, ">= 0, or -1 (--seed)"),
        ("precision", lambda v: v in ("auto", "fp32", "bf16"), "auto, fp32 or bf16"),
        ("compile", lambda v: v in ("auto", "on", "off"), "auto, on or off"),
        ("schedule", lambda v: v in ("cosine", "constant"), "cosine or constant"),
    ]
    for name, ok, allowed in rules:
        if hasattr(args, name) and not ok(getattr(args, name)):
            raise SystemExit(f"error: --{name} must be {allowed}, got {getattr(args, name)!r}")
    if args.batch_size % args.micro_batch:
        raise SystemExit(f"error: --batch_size {args.batch_size} must be a multiple of --micro_batch {args.micro_batch}")
    settings = args.settings.split(",")
    if not settings or not set(settings) <= {"none", "implicit", "explicit"}:
        raise SystemExit(f"error: --settings takes none, implicit, explicit (comma-separated); got {args.settings!r}")
    # a conflict student without its conflict trains on exactly the no-conflict student's data and loss, and
    # would be reported as a conflict result
    if "implicit" in settings and args.n_extra == 0:
        raise SystemExit("error: --settings implicit learns from --n_extra helpfulness pairs, and --n_extra is 0: "
                         "give --n_extra > 0 or leave implicit out of --settings")
    if "explicit" in settings and getattr(args, "alpha", None) == 0:
        raise SystemExit("error: --settings explicit weighs its conflict term by --alpha, and --alpha is 0: "
                         "give --alpha > 0 or leave explicit out of --settings")
    # the students' data order would be --seed's: the same stage key, so the no-conflict student is reused and a
    # churn measured against it reads 0
    if args.seed >= 0 and getattr(args, "student_seed", -1) == args.seed:
        raise SystemExit(f"error: --student_seed {args.student_seed} is --seed: the students would train in the run's "
                         "own data order and change nothing; give another seed (a churn run) or leave it at -1")
    for option in ("weak", "strong", "intermediate"):
        if getattr(args, option):
            check_model_name(option, getattr(args, option))
    check_hub_cache(args)
    check_out_dir(args.out_dir)
    torchrun = "LOCAL_RANK" in os.environ
    if args.fsdp_cpu_offload and not torchrun:
        raise SystemExit("error: --fsdp_cpu_offload shards with FSDP, which needs torchrun (torchrun --nproc_per_node N ...)")
    if args.bench and torchrun:
        raise SystemExit("error: --bench times one process; run it with python, not torchrun")


def check_out_dir(path):
    """--out_dir is a folder this process can write or create (its nearest existing ancestor is writable)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise SystemExit(f"error: --out_dir {path}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --out_dir {path}: {p} is not writable by this user")


CUT = re.compile(r":first\d+$")  # NAME:firstK, a model cut to its first K layers (pretrained.py builds it)


def check_model_name(option, name):
    """A model is a Hub id ("gpt2", "org/name"), a local folder holding a config.json, a .gguf file,
    tiny:LxD[+ptN], or any of the first three followed by :firstK. Say which part is wrong, before loading."""
    if name.startswith("tiny:"):
        m = re.fullmatch(r"tiny:(\d+)x(\d+)(?:\+pt(\d+))?", name)
        if not m or int(m[1]) < 1 or int(m[2]) < 1 or int(m[2]) % max(1, int(m[2]) // 16):
            raise SystemExit(f"error: --{option} {name}: a tiny model is tiny:LxD or tiny:LxD+ptN with L >= 1 layers "
                             "and a width D >= 1 that its max(1, D // 16) attention heads divide (e.g. tiny:2x64+pt600)")
        return
    base = CUT.sub("", name)
    if os.path.exists(base):
        if base.endswith(".gguf") and os.path.isfile(base):
            return
        if not os.path.isfile(os.path.join(base, "config.json")):
            raise SystemExit(f"error: --{option} {base}: holds no model config (config.json); give a model folder "
                             "saved with save_pretrained, a .gguf file, or a Hub id")
    elif base.endswith(".gguf") or os.path.isabs(base) or base.startswith(".") or base.count("/") > 1 \
            or os.path.isdir(base.split("/")[0]):
        raise SystemExit(f"error: --{option} {base}: no such file or folder")


def check_hub_cache(args):
    """Offline (HF_HUB_OFFLINE=1), every Hub model the run names is in the local cache: one line naming those that
    are not and how to give local files instead, before the data loads (the Hub data may be missing too, but a
    model is what the user named)."""
    import huggingface_hub
    if not huggingface_hub.is_offline_mode():
        return
    missing = []
    for option in ("weak", "strong", "intermediate"):
        name = getattr(args, option)
        repo = CUT.sub("", name or "")
        if not repo or repo.startswith("tiny:") or repo.endswith(".gguf") or os.path.exists(repo):
            continue
        if not isinstance(huggingface_hub.try_to_load_from_cache(repo, "config.json"), str):
            missing.append(f"--{option} {name}")
    if missing:
        raise SystemExit(f"error: offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache "
                         f"({huggingface_hub.constants.HF_HUB_CACHE}): {', '.join(missing)}; download once online, "
                         "or point --weak / --strong / --intermediate at a local model folder (save_pretrained) or "
                         ".gguf file")


# ----------------------------------------------------------------------------------------------------
# models

def resolve_models(args, splits):
    """{role: folder or Hub id} of the weak, strong and intermediate models: `tiny:LxD` built once (toy.py) on the
    splits' texts, a `.gguf` file or `NAME:firstK` converted once (converted), anything else as it is. Each Hub
    id and folder is checked (check_model) before anything is built: a misspelt --strong stops the run before
    the weak ceiling trains, not after."""
    names = {role: getattr(args, role) for role in ("weak", "strong", "intermediate") if getattr(args, role)}
    for role, name in names.items():
        if not (name.startswith("tiny:") or needs_conversion(name)):
            check_model(role, name)
    models = {}
    for role, name in names.items():
        if name.startswith("tiny:"):
            import toy
            texts = [t for s in ("gt", "w2s", "test") for p in splits[s] for t in (p["chosen"], p["rejected"])]
            path = toy.build_tiny(name, texts, Path(args.out_dir) / "models", args.seed)
        else:
            path = converted(name, Path(args.out_dir) / "models")
            if path != name:
                check_model(role, path)  # a cut model keeps its source's tokenizer, a stand-in one included
        models[role] = path
    return models


def check_model(option, name):
    """A Hub id or local model folder has a config transformers reads, a tokenizer that encodes text, and (a
    folder) whole weights; else one line naming --option and the model. Weights on the Hub are not downloaded
    here: that is the ceiling's own first step."""
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "" if os.path.isdir(name) else " (not a local folder: looked up on the Hugging Face Hub)"
        raise SystemExit(f"error: --{option} {name}: no model config could be read{where}: "
                         f"{str(e).strip().splitlines()[0]}")
    if os.path.isdir(name):
        common.check_weights(name)
    common.load_tokenizer(name)


def needs_conversion(name):
    """A `.gguf` file or a `NAME:firstK` spelling: a model pretrained.py builds into a folder (converted)."""
    return name.endswith(".gguf") or CUT.search(name) is not None


def converted(name, root):
    """A `.gguf` file or a `NAME:firstK` spelling -> its folder under `root` (pretrained.py, imported only then)."""
    if needs_conversion(name):
        import pretrained
        return pretrained.resolve(name, root)
    return name


# ----------------------------------------------------------------------------------------------------
# run folders: one per configuration, locked while a run uses it

def slug(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")[-60:]


# Options that change no number of a run (memory for time, what to run, how to print): in no folder name or key.
NO_EFFECT = ("settings", "force", "log_every", "out_dir", "micro_batch", "grad_ckpt", "fsdp_cpu_offload", "bench",
             "bench_model")
# Options that choose a stage's data, model or loss: its key holds what they chose (stage_key), so that a stage
# re-runs exactly when what it reads changes (eval_every: only students write eval_curve.jsonl).
SELECTION = ("eval_every", "data", "n_gt", "n_w2s", "n_test", "n_extra", "helpful", "weak", "strong", "intermediate",
             "max_len", "weak_max_len", "alpha", "hard_labels", "conf_threshold", "conf_scale", "drop_weak_errors",
             "student_seed")


def config_hash(args):
    """A short hash of every option that can change a number of the run (all but NO_EFFECT)."""
    config = {k: v for k, v in dataclasses.asdict(args).items() if k not in NO_EFFECT}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_dir(args, method):
    """runs/<method>-<data>-<weak>-<strong>-s<seed>-<config hash>: two configurations never share a folder."""
    data = Path(args.data).name if os.path.isdir(args.data) else args.data
    parts = (method, data, args.weak, args.strong, f"s{args.seed}", config_hash(args))
    return Path(args.out_dir) / "-".join(slug(x) for x in parts)


def open_run(args, method):
    """Create or reopen the run folder, locked for this process (an flock, which the OS releases however the
    process ends), and remove an earlier run's report: the report beside config.json is always this one's.
    Returns (folder, open lock file: keep it open)."""
    import fcntl
    path = run_dir(args, method)
    path.mkdir(parents=True, exist_ok=True)
    lock = open(path / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise SystemExit(f"error: another run (pid {lock.read().strip() or '?'}) is using {path}; wait for it to end")
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    for stale in ("results.json", "report.md"):
        (path / stale).unlink(missing_ok=True)
    write_json(path / "config.json", dataclasses.asdict(args))
    return path, lock


@dataclasses.dataclass
class Run:
    """What every stage of one run reads: its options, data splits, locked folder, models and code digest."""
    args: object
    method: str  # rm, dpo or simpo: the run folder's first word
    splits: dict  # {"gt", "w2s", "test", "extra"}: lists of text pairs in ground-truth orientation
    data_stats: dict  # split sizes, dropped and shortened counts: the report's "Data" line
    root: Path  # the run folder
    lock: object  # the open lock file (open_run): it holds the folder for this process while it is open
    models: dict  # role (weak, strong, intermediate) -> folder or Hub id
    model_digests: dict  # role -> what stands for the model in stage keys (model_digest)
    code: dict  # code_digest of the code that computes a stage, recorded in each stage's key
    started: dict = dataclasses.field(default_factory=dict)  # stage name -> when it started (load_stage)


def start_run(args, method, code_files):
    """Load the data splits, open and lock the run folder, build or resolve the models, digest the code (under
    torchrun rank 0 does it first; the other ranks then find the models built)."""
    common.init_distributed()
    say_full_disk_in_one_line(args.out_dir)
    print(f"[{method}] precision {args.precision}" + (" (bf16 autocast over fp32 weights; heads, log-probs and losses "
                                                      "in fp32)" if args.precision == "bf16" else ""))
    splits, data_stats = common.load_splits(args)
    root, lock = open_run(args, method) if rank() == 0 else (run_dir(args, method), None)
    models = resolve_models(args, splits) if rank() == 0 else None
    barrier()
    models = models or resolve_models(args, splits)
    digests = {role: model_digest(path) for role, path in models.items()}
    return Run(args, method, splits, data_stats, root, lock, models, digests, code_digest(code_files))


def say_full_disk_in_one_line(out_dir):
    """A full disk ends the run with one line naming where, not a traceback whose OSError ("[Errno 28] No space
    left on device") names no file: a training log's flush or a model being saved meets it where nothing catches
    it. Any other uncaught error keeps its traceback. A stage cut short leaves no stage.json (it is written last),
    so it is computed again, never read."""
    def excepthook(kind, error, traceback):
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            where = error.filename or f"a file under --out_dir {out_dir}"
            print(f"error: {error.strerror} while writing {where}; free some space and run again (finished stages "
                  "are kept)", file=sys.stderr)
        else:
            sys.__excepthook__(kind, error, traceback)
    sys.excepthook = excepthook


# ----------------------------------------------------------------------------------------------------
# stages: each method's stage() guards one (plan_stage(...); load_stage(...), and if None, train and save_stage(...))

Plan = collections.namedtuple("Plan", "key model max_len args known")


def plan_stage(run, name, pairs, targets, label_pairs=None, *, max_len=None, alpha=0.0):
    """What the stage `name` reads, from its name and data alone: its cache key; the model it trains (weak, strong,
    intermediate: the stage's own; every "student-..." the strong one), so that key and stage cannot disagree; its
    max_len (default --max_len); its options (a student's data order from --student_seed where given); and for a
    student with --eval_every, `known`: (weak correct, strong correct) per test pair, the knowledge areas its
    eval_curve.jsonl is scored in (else None)."""
    args, student = run.args, name.startswith("student-")
    model = "strong" if student else name
    if student and args.student_seed >= 0:
        args = dataclasses.replace(args, seed=args.student_seed)
    max_len = max_len or args.max_len
    curve = student and args.eval_every > 0
    key = stage_key(run, model, max_len, pairs, targets, run.splits["test"], label_pairs, alpha=alpha, curve=curve,
                    seed=args.seed if student else None)
    known = [[row["correct"] for row in common.read_jsonl(run.root / ceiling / "predictions.jsonl")]
             for ceiling in ("weak", "strong")] if curve else None
    return Plan(key, model, max_len, args, known)


def stage_key(run, role, max_len, pairs, targets, test_pairs, label_pairs=None, alpha=0.0, curve=False, seed=None):
    """The key of a stage that trains a fresh `role` model on `pairs` with `targets` and scores `test_pairs` (and
    `label_pairs`): the options, the model, max_len, alpha, the data and the code; with curve (--eval_every)
    the measures too, which compute its eval_curve.jsonl; a student's seed (--student_seed) where given."""
    data = digest(pairs_digest(pairs, targets), pairs_digest(test_pairs), pairs_digest(label_pairs or []))
    reads = dict(model=run.model_digests[role], max_len=max_len, alpha=alpha, data=data, **run.code)
    if seed is not None:
        reads["student_seed"] = seed
    if curve:
        reads.update(eval_every=run.args.eval_every, measures=measures_digest())
    return options_key(run.args, **reads)


def load_stage(run, name, key):
    """The summary of the finished stage `name` with this key, here or copied from a sibling run folder (a weak
    ceiling shared by runs with other strong models trains once), or None: then its folder is empty (what a
    stage cut short left is wiped), ready for the stage."""
    stage_dir = run.root / name
    hit = from_rank0(None if run.args.force or rank() != 0 else find_cached(stage_dir, name, key))  # rank 0 looks
    if hit is None:
        if rank() == 0:
            shutil.rmtree(stage_dir, ignore_errors=True)
            stage_dir.mkdir(parents=True)
        barrier()
        run.started[name] = time.time()
    return hit


def save_stage(run, name, key, summary, outputs):
    """Write a stage's `outputs` ({file: rows with a "margin"}) whole, then stage.json (summary, key, code, file
    digests) last: a stage without it is unfinished. A margin that is not finite stops the run; a diverged
    training curve is said and recorded. Returns the summary."""
    barrier()  # torchrun: every rank finished, so a rank that failed never lets rank 0 write stage.json
    if rank() != 0:
        return from_rank0(None)
    stage_dir = run.root / name
    for file, rows in outputs.items():
        check_finite([row["margin"] for row in rows], f"[{name}] {file}")
        write_jsonl(stage_dir / file, rows)
    curves = {f.name: training_health([row["loss"] for row in common.read_jsonl(f)])
              for f in sorted(stage_dir.glob("*metrics.jsonl"))}
    for file, health in curves.items():
        if health["diverged"]:
            print(f"warning: [{name}] training diverged ({file}: loss {health['first_loss']:.4g} at the first step, "
                  f"{health['final_loss']:.4g} at the end): this stage's numbers are not valid; try a smaller --lr")
    files = {f.name: file_digest(f) for f in sorted(stage_dir.iterdir()) if f.is_file()}
    summary = {**summary, "key": key, "dir": str(stage_dir), "seconds": round(time.time() - run.started[name], 1),
               "curves": curves, "files": files, **run.code}
    write_json(stage_dir / "stage.json", summary)
    return from_rank0(summary)


def find_cached(stage_dir, name, key):
    """The summary of a finished stage with this key, here or in a sibling run folder (then copied here), or None.
    A damaged or half-copied stage (read_stage) is re-run, never read."""
    for candidate in [stage_dir, *sorted(p for p in stage_dir.parent.parent.glob(f"*/{name}") if p != stage_dir)]:
        saved = read_stage(candidate)
        if saved is None or saved.get("key") != key:
            continue
        if candidate != stage_dir:
            try:
                shutil.rmtree(stage_dir, ignore_errors=True)
                shutil.copytree(candidate, stage_dir)
            except OSError:  # the other run is rewriting it: train here instead
                continue
        print(f"[{name}] cached in {candidate} (use --force to re-run)")
        return {**saved, "dir": str(stage_dir)}
    return None


def read_stage(stage_dir):
    """A stage folder's stage.json if it reads back and every file it lists has its recorded digest, else None
    (with a warning when the folder was damaged)."""
    done = Path(stage_dir) / "stage.json"
    if not done.exists():
        return None
    try:
        saved = json.loads(done.read_text())
        files = saved.get("files", {})
    except (OSError, ValueError, AttributeError):
        print(f"warning: {done} is damaged (not a stage summary): the stage is treated as unfinished")
        return None
    for file, expected in files.items():
        path = Path(stage_dir) / file
        if not path.is_file() or file_digest(path) != expected:
            print(f"warning: {path} is missing or differs from what {done} recorded: the stage is treated as "
                  "unfinished")
            return None
    return saved


def read_predictions(stage):
    return common.read_jsonl(Path(stage["dir"]) / "predictions.jsonl")


def read_labels(stage):
    return common.read_jsonl(Path(stage["dir"]) / "labels.jsonl")


# ----------------------------------------------------------------------------------------------------
# digests

def digest(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def pairs_digest(pairs, targets=None):
    return digest(*(t for p in pairs for t in (p["chosen"], p["rejected"])), *(targets or ()))


def options_key(args, **reads):
    """The training options (all but NO_EFFECT and SELECTION) and what a stage reads (stage_key), hashed."""
    options = {k: v for k, v in dataclasses.asdict(args).items() if k not in NO_EFFECT + SELECTION}
    return digest(json.dumps({**options, **reads}, sort_keys=True, default=str))


def model_digest(name):
    """A local folder by its files' content (new weights at the same path are a new model), a Hub id by its name."""
    if not os.path.isdir(name):
        return name
    h = hashlib.sha256()
    for f in sorted(p for p in Path(name).rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(name)}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# common.py's measures read finished stages' predictions: a stage's code digest stops at their banner, so that a
# new or changed measure re-trains nothing.
MEASURES_BANNER = "\n# " + "-" * 100 + "\n# measures:"


def code_digest(files):
    """The code that computes a stage (the method script, common.py above MEASURES_BANNER) and the versions of the
    packages that run it: a change to either re-runs the stage instead of mixing old and new numbers."""
    import transformers
    return {"code": digest(*(Path(f).read_text().split(MEASURES_BANNER)[0] for f in files)),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def measures_digest():
    """common.py from MEASURES_BANNER on: in the key of a student whose eval curve they compute."""
    text = Path(common.__file__).read_text()
    if MEASURES_BANNER not in text:
        raise RuntimeError(f"{common.__file__} has no measures banner: the stage cache would digest all of it")
    return digest(text.split(MEASURES_BANNER, 1)[1])


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# health checks

def check_finite(values, where):
    """Stop the run at a NaN or infinite margin, which would otherwise become an accuracy or a weak label."""
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise SystemExit(f"error: {where}: {len(bad)} of {len(values)} margins are not finite (first: pair {bad[0]}): "
                         "the model diverged, try a smaller --lr; this stage was not saved")


def training_health(losses):
    """A training curve diverged if its final loss (mean of the last tenth of the steps) exceeds twice its first
    plus 0.1: every loss here starts near its chance value (log 2), and a working run ends near or below it."""
    tail = losses[-max(1, len(losses) // 10):]
    first, final = losses[0], sum(tail) / len(tail)
    return {"first_loss": first, "final_loss": final, "diverged": final > 2 * first + 0.1}


# ----------------------------------------------------------------------------------------------------
# files: written whole or not at all

def write_atomic(path, text):
    """A file whole or not at all (a temporary file beside it, then a rename), with the usual permissions (0666
    less the umask, not mkstemp's 0600). A write the system refuses (a full disk, a read-only folder) stops the
    run with one line naming the file, which the OSError itself does not. Under torchrun rank 0 writes."""
    if rank() != 0:
        return
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise SystemExit(f"error: cannot write {path}: {e.strerror or e} (errno {e.errno}); nothing of it was "
                             "kept, and a stage whose files are not all written is run again next time")
        raise


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path, rows):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------------
# report

def build_results(stages, args, data_stats, test_pairs, extra_metrics=()):
    """Every number of the experiment from the stages' predictions: accuracies, PGR, knowledge space, DS, the
    length baseline, and notes on what makes a number not valid (divergence, no capability gap, length)."""
    correct = {name: [row["correct"] for row in read_predictions(st)] for name, st in stages.items()}
    weak, strong = stages["weak"], stages["strong"]
    results = {"config": dataclasses.asdict(args), "data": data_stats, "models": {}, "students": {}}
    for name, st in stages.items():
        results["models"][name] = {k: st[k] for k in ("accuracy", "ties", "n", "n_train", "cut", *extra_metrics)
                                   if k in st}
        if (Path(st["dir"]) / "labels.jsonl").exists():  # a labeller: what its labels can teach
            results["models"][name]["labels"] = common.label_informativeness([r["margin"] for r in read_labels(st)])
        results["models"][name]["code"] = st.get("code")
    notes, invalid = [], []
    for name, st in stages.items():
        for file, health in st.get("curves", {}).items():
            if health["diverged"]:
                invalid.append(name)
                notes.append(f"{name} diverged ({file}: loss {health['first_loss']:.4g} at the first step, "
                             f"{health['final_loss']:.4g} at the end): its numbers, and every number built on them, "
                             "are not valid.")
        # a model that scores every pair a tie tells no response from the other (a tokenizer that encodes
        # nothing gives exactly that): its accuracy 0 is not a measurement
        if st.get("n") and st.get("ties") == st["n"]:
            invalid.append(name)
            notes.append(f"{name} scored every one of the {st['n']} test pairs as a tie (margin 0): its numbers, and "
                         "every number built on them, are not valid.")
    shorter = common.length_rule(test_pairs)
    decided = [i for i, s in enumerate(shorter) if s is not None]
    # accuracy counts an equal-length pair as wrong, like a tie; agreement reads only the pairs where the rule
    # prefers one response (a model that is simply wrong must not "agree" with a rule that did not choose)
    # (null where it decides no pair at all: a testbed whose responses are equally long, where length tells nothing)
    results["length_baseline"] = {"accuracy": sum(s is True for s in shorter) / len(shorter) if decided else None,
                                  "equal_length": len(shorter) - len(decided), "agreement": {}}
    for name in stages:
        c = correct[name]
        agree = sum(c[i] == shorter[i] for i in decided) / len(decided) if decided else None
        results["length_baseline"]["agreement"][name] = agree
        if agree is not None and agree > 0.9:
            notes.append(f"{name} agrees with \"prefer the shorter response\" on {agree:.1%} of the test pairs: its "
                         "accuracy and knowledge areas mostly measure length.")
    for name in [n for n in stages if n.startswith("student-")]:
        setting = name[len("student-"):]
        acc = stages[name]["accuracy"]
        entry = {"accuracy": acc, "pgr": common.pgr(acc, weak["accuracy"], strong["accuracy"])}
        entry.update(common.knowledge_space(correct["weak"], correct["strong"], correct[name]))
        entry["ds_restated"] = common.disagreement_share(correct["weak"], correct["strong"], correct[name])
        results["students"][setting] = entry
    if strong["accuracy"] <= weak["accuracy"]:
        notes.append("PGR is null: the strong ceiling does not beat the weak ceiling.")
    base = results["students"].get("none")
    for setting, entry in results["students"].items():
        if setting != "none" and base is not None:
            entry["conflict_tax"] = common.conflict_tax(correct["weak"], correct["strong"], correct["student-none"],
                                                        correct[f"student-{setting}"])
            if entry["ds"] is not None and base["ds"] is not None:
                entry["delta_ds"] = entry["ds"] - base["ds"]
                entry["delta_ds_p"] = entry["conflict_tax"]["delta_ds_p"]
    results["notes"] = notes
    results["valid"] = not invalid
    return results


def fmt(x, digits=3):
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def rate(x, ci):  # "0.693 [0.58, 0.79]"; "–" for an empty area
    return fmt(x) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def render_report(results, title):
    lines = [f"# {title}", ""]
    if not results.get("valid", True):
        lines += ["**These numbers are not valid: a stage diverged or scored every pair as a tie (see the notes "
                  "below).**", ""]
    lines += ["| model | accuracy | ties | test pairs | trained on |", "|---|---|---|---|---|"]
    for name, m in results["models"].items():
        lines.append(f"| {name} | {fmt(m['accuracy'])} | {m['ties']} | {m['n']} | {m.get('n_train', '–')} |")
    extra = [k for m in results["models"].values() for k in m
             if k not in ("accuracy", "ties", "n", "n_train", "code", "cut", "labels")]
    for key in dict.fromkeys(extra):
        lines += ["", f"| model | {key} |", "|---|---|"]
        lines += [f"| {n} | {fmt(m.get(key))} |" for n, m in results["models"].items()]
    for name, m in results["models"].items():
        if "labels" in m:
            lines += ["", f"Labels of {name} (p = sigmoid(margin) on the pairs it labels): mean |margin| "
                      f"{m['labels']['mean_abs_margin']:.3f}, mean |p − 0.5| {m['labels']['mean_abs_p']:.3f}, share of p "
                      f"beyond 0.1 from 0.5: {m['labels']['share_beyond_0.1']:.3f}."]
    if results["students"]:
        lines += ["", "| student | accuracy | PGR | DS (err in WU&SK) [95% CI] | err in WK&SK [95% CI] | ΔDS (McNemar p) |",
                  "|---|---|---|---|---|---|"]
        for setting, e in results["students"].items():
            wu, wk = e["areas"][common.WU_SK], e["areas"][common.WK_SK]
            delta = fmt(e.get("delta_ds")) + (f" (p {e['delta_ds_p']:.2g})" if e.get("delta_ds_p") is not None else "")
            lines.append(f"| {setting} | {fmt(e['accuracy'])} | {fmt(e['pgr'])} | {rate(wu['student_error'], wu['ci'])} | "
                         f"{rate(wk['student_error'], wk['ci'])} | {delta} |")
        lines += ["", "Knowledge space (size of each area; the student's error rate inside it, [95% Wilson interval]):",
                  "", "| area | n | " + " | ".join(results["students"]) + " |",
                  "|---|---|" + "---|" * len(results["students"])]
        first = next(iter(results["students"].values()))
        for area in common.AREAS:
            errs = " | ".join(rate(e["areas"][area]["student_error"], e["areas"][area]["ci"])
                              for e in results["students"].values())
            lines.append(f"| {area} | {first['areas'][area]['n']} | {errs} |")
        taxed = {s: e["conflict_tax"] for s, e in results["students"].items() if "conflict_tax" in e}
        if taxed:
            lines += ["", "Conflict tax against the no-conflict student: in each area, of the pairs it gets right, the share "
                      "the conflict student gets wrong (taxed / its right pairs) [95% CI]; and of those it gets wrong, the "
                      "share the conflict student gets right (fixed):", "",
                      "| area | " + " | ".join(f"{s}: tax | {s}: fixed" for s in taxed) + " |",
                      "|---|" + "---|---|" * len(taxed)]
            for area in common.AREAS:
                cells = []
                for t in taxed.values():
                    a = t["areas"][area]
                    cells += [f"{a['taxed']}/{a['base_right']} = {rate(a['tax'], a['tax_ci'])}",
                              f"{a['fixed']}/{a['base_wrong']} = {rate(a['fix'], a['fix_ci'])}"]
                lines.append(f"| {area} | " + " | ".join(cells) + " |")
            for s, t in taxed.items():
                lines += ["", f"Where {s}'s tax lands: of the {t['sk_taxed']} strong-known pairs it turned wrong, "
                          f"{rate(t['share_wu'], t['share_wu_ci'])} are weak-unknown, against {fmt(t['base_rate_wu'])} "
                          "if the tax fell evenly on the strong-known pairs the no-conflict student gets right "
                          "(deception in the paper's sense: a share clearly above that)."]
        lines += ["", "DS as the paper's reviewers restate it (a restatement, not the paper's text): of the test pairs on "
                  "which the student disagrees with the strong ceiling, the share in weak-unknown & strong-known: "
                  + ", ".join(f"{s} {e['ds_restated']['in_wu_sk']}/{e['ds_restated']['n_disagree']} = "
                              f"{rate(e['ds_restated']['share'], e['ds_restated']['ci'])}"
                              for s, e in results["students"].items()) + "."]
    lb = results["length_baseline"]
    if lb["accuracy"] is None:
        lines += ["", f'Length baseline: the two responses of every test pair ({lb["equal_length"]}) are equally long, so '
                  '"prefer the shorter response" decides none of them: length cannot tell chosen from rejected here.']
    else:
        lines += ["", f'Length baseline: "prefer the shorter response" is right on {fmt(lb["accuracy"])} of the test '
                  f'pairs (equal lengths count as wrong: {lb["equal_length"]} pairs); agreement of each model with it, on '
                  "the pairs whose responses differ in length: " + ", ".join(f"{n} {fmt(v)}" for n, v in
                                                                             lb["agreement"].items()) + "."]
    for note in results["notes"]:
        lines += ["", f"Note: {note}"]
    c = results["config"]
    key_options = [k for k in ("precision", "lr", "head_lr", "epochs", "batch_size", "max_len", "weak_max_len", "warmup_ratio", "grad_clip",
                               "sft_lr", "sft_epochs", "beta", "gamma", "alpha", "conf_threshold", "hard_labels", "seed")
                   if k in c]
    lines += ["", "Options: " + ", ".join(f"{k}={c[k]}" for k in key_options) + " (all of them: results.json)"]
    codes = {n: (m.get("code") or "?") for n, m in results["models"].items()}
    lines += ["", "Code (digest of the method script and common.py above its measures) that computed "
              "each stage: "
              + ", ".join(f"{n} {v}" for n, v in codes.items())
              + (" — stages computed by different code" if len(set(codes.values())) > 1 else "")]
    d = results["data"]
    lines += ["", "Data: " + ", ".join(f"{k}={v}" for k, v in d.items() if not isinstance(v, dict))
              + f"; dropped: {d['dropped'] or 'none'}"]
    cut = {n: m["cut"] for n, m in results["models"].items() if "cut" in m}
    if cut:
        lines += ["", "Texts longer than the model's max_len, cut (of each split a stage read, 2 texts a pair): "
                  + "; ".join(n + " " + ", ".join(f"{split} {k}" for split, k in c.items()) for n, c in cut.items())]
    return "\n".join(lines) + "\n"


def report(run, stages, title, extra_metrics=()):
    """results.json and report.md into the run folder; prints the report, returns the results."""
    results = build_results(stages, run.args, run.data_stats, run.splits["test"], extra_metrics)
    results["method"], results["run_dir"] = run.method, str(run.root)
    a = run.args
    text = render_report(results, f"{title}: {a.weak} -> {a.strong} on {a.data}")
    write_json(Path(run.root) / "results.json", results)
    write_atomic(Path(run.root) / "report.md", text)
    print(text)
    # under torchrun, no rank ends while another is still at work: gloo sometimes aborts a rank that exits
    # first ("terminate called without an active exception"), and torchrun then fails a finished run
    barrier()
    return results
