"""Run infrastructure (runs.py): options (parsing, help, bad values), model names, cache digests and keys,
atomic writes, the health checks that stop or flag a run, and damaged files and odd places. Each error is one
line naming what is wrong.
"""
import dataclasses
import errno
import json
import os
import types
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

import common
import dpo_w2s
import rm_w2s
import runs
import simpo_w2s


# ---- options

@dataclasses.dataclass
class _Args:
    n: int = 1
    lr: float = 0.1
    name: str = "x"
    flag: bool = False
    on: bool = True


def test_parse_args():
    a = runs.parse_args(_Args, ["--n", "5", "--lr=1e-3", "--name", "a b", "--flag", "--no_on"])
    assert (a.n, a.lr, a.name, a.flag, a.on) == (5, 1e-3, "a b", True, False)
    assert runs.parse_args(_Args, []) == _Args()
    assert runs.parse_args(_Args, ["--flag", "--n", "2"]) == _Args(n=2, flag=True)  # bare flag before a key
    assert runs.parse_args(_Args, ["--flag", "false", "--on=false"]) == _Args(flag=False, on=False)
    assert runs.parse_args(_Args, ["--name="]).name == ""
    assert runs.parse_args(_Args, ["--lr", "-0.5"]).lr == -0.5
    r = runs.parse_args(rm_w2s.Args, ["--n-gt", "7", "--no_group_by_length", "--settings=none"])
    assert (r.n_gt, r.group_by_length, r.settings) == (7, False, "none")
    for bad in (["--nope", "1"], ["--n", "abc"], ["--n", "1.5"], ["--lr", "x"], ["--n"], ["n", "1"], ["--no_name"]):
        with pytest.raises(SystemExit):
            runs.parse_args(_Args, bad)


def test_help_lists_every_option_with_its_comment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        runs.parse_args(rm_w2s.Args, ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(rm_w2s.Args):
        assert f"--{f.name} " in out
    assert "weight of the explicit-conflict term" in out


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
        runs.check_model_name("strong", str(tmp_path / "notamodel"))
    runs.check_model_name("strong", "gpt2")  # Hub ids pass untouched
    runs.check_model_name("strong", "org/model-name")


@pytest.mark.parametrize("module,argv,setting", [
    (rm_w2s, ["--settings", "none,implicit", "--n_extra", "0"], "implicit"),
    (dpo_w2s, ["--n_extra", "0"], "implicit"),  # the default settings hold implicit
    (simpo_w2s, ["--settings", "none,explicit", "--alpha", "0"], "explicit"),
])
def test_a_conflict_setting_without_its_conflict_is_refused(module, argv, setting, tmp_path):
    """An implicit student without helpfulness pairs, or an explicit one whose term weighs 0, would train on the
    no-conflict student's data and loss and be reported as a conflict result (ΔDS 0.0)."""
    args = runs.parse_args(module.Args, ["--data", "toy", "--out_dir", str(tmp_path), *argv])
    with pytest.raises(SystemExit) as info:
        runs.check_args(args)
    message = str(info.value)
    assert message.startswith(f"error: --settings {setting} ") and "\n" not in message, message
    runs.check_args(runs.parse_args(module.Args, ["--data", "toy", "--out_dir", str(tmp_path), "--settings", "none",
                                                  "--n_extra", "0", "--alpha", "0"]))  # no conflict asked for: fine


def broken_model(tiny, folder, damage):
    """A copy of the tiny model folder with its tokenizer files or weights removed, or its weights cut short."""
    shutil.copytree(tiny, folder)
    weights = folder / "model.safetensors"
    if damage == "no tokenizer":
        for f in folder.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                f.unlink()
    elif damage == "no weights":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def test_a_tokenizer_that_encodes_nothing_stops_the_run_naming_the_folder(tmp_path, tiny):
    """transformers loads a folder without tokenizer files with a stand-in tokenizer that encodes every text as
    no tokens: every text would be its EOS alone, every margin 0, every test pair a tie."""
    folder = broken_model(tiny, tmp_path / "no-tokenizer", "no tokenizer")
    with pytest.raises(SystemExit) as info:
        common.load_tokenizer(str(folder))
    message = str(info.value)
    assert message.startswith(f"error: the tokenizer of {folder} turns text into no ordinary tokens") \
        and "\n" not in message, message
    assert common.load_tokenizer(tiny).eos_token_id is not None


@pytest.mark.parametrize("damage", ["no weights", "cut weights"])
def test_missing_or_cut_weights_stop_the_load_naming_the_folder(tmp_path, tiny, damage):
    from transformers import AutoModel
    folder = broken_model(tiny, tmp_path / "model", damage)
    tok = common.load_tokenizer(str(folder))
    with pytest.raises(SystemExit) as info:
        common.load_model(str(folder), AutoModel, tok, torch.device("cpu"))
    message = str(info.value)
    assert message.startswith(f"error: {folder}") and "\n" not in message, message
    assert ("cut short" in message) == (damage == "cut weights")


@pytest.mark.parametrize("damage", ["no tokenizer", "no weights", "cut weights", "misspelt Hub id"])
def test_every_model_is_found_or_refused_before_the_first_stage(tmp_path, tiny, damage, monkeypatch):
    """A broken --strong stops the run with one line naming it before the weak ceiling trains (the tokenizer
    case used to run to the end and report accuracy 0.000 as valid)."""
    if damage == "misspelt Hub id":
        import huggingface_hub.constants
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network wait: found or not
        strong = "nobody-w2s-test/no-such-model"
    else:
        strong = str(broken_model(tiny, tmp_path / "strong-model", damage))
    with pytest.raises(SystemExit) as info:
        rm_w2s.main(["--data", "toy", "--n_gt", "8", "--n_w2s", "8", "--n_test", "8", "--settings", "none",
                     "--n_extra", "0", "--weak", "tiny:1x32", "--strong", strong, "--batch_size", "8",
                     "--micro_batch", "8", "--log_every", "1000", "--out_dir", str(tmp_path / "runs")])
    message = str(info.value)
    assert message.startswith("error: ") and strong in message and "\n" not in message, message
    assert not list((tmp_path / "runs").glob("*/weak")), "no stage may start before every model is found"


def test_a_report_whose_test_pairs_are_all_ties_is_not_valid(tmp_path):
    """A model that calls every test pair a tie has accuracy 0.000 for no reason it learnt: never a valid report."""
    pairs = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no {i}"}
             for i in range(4)]

    def results(weak_margins):
        stages = {}
        for name, margins in (("weak", weak_margins), ("strong", [1.0, 2.0, 1.0, -1.0]),
                              ("student-none", [1.0, -1.0, 1.0, 1.0])):
            (tmp_path / name).mkdir(exist_ok=True)
            runs.write_jsonl(tmp_path / name / "predictions.jsonl", common.prediction_rows(margins))
            stages[name] = {**common.accuracy(margins), "n_train": 4, "dir": str(tmp_path / name)}
        return runs.build_results(stages, rm_w2s.Args(), {"dropped": {}}, pairs)

    assert results([1.0, -1.0, 0.0, 1.0])["valid"] is True  # one tie among real margins is just a wrong pair
    tied = results([0.0] * 4)
    assert tied["valid"] is False
    assert any(n.startswith("weak scored every one of the 4 test pairs as a tie") for n in tied["notes"]), tied["notes"]
    assert "These numbers are not valid" in runs.render_report(tied, "t")


# ---- health checks

def test_training_health_flags_divergence():
    assert not runs.training_health([0.693, 0.6, 0.5, 0.4])["diverged"]
    assert not runs.training_health([0.693] * 20)["diverged"]  # learnt nothing, but did not diverge
    assert runs.training_health([0.693, 5.0, 1e6, 2e6])["diverged"]
    health = runs.training_health([0.7] + [0.6] * 18 + [1.6])  # the last tenth of 20 steps: 2 steps
    assert health == {"first_loss": 0.7, "final_loss": pytest.approx(1.1), "diverged": False}


def test_check_finite_stops_with_the_place():
    runs.check_finite([0.1, -2.0, 0.0], "x")
    with pytest.raises(SystemExit, match=r"\[weak\] labels.jsonl: 2 of 3 margins are not finite \(first: pair 1\)"):
        runs.check_finite([0.1, float("nan"), float("inf")], "[weak] labels.jsonl")


# ---- files and the stage cache

def test_write_atomic_respects_the_umask_and_leaves_no_temp_file(tmp_path):
    old = os.umask(0o022)
    try:
        runs.write_json(tmp_path / "a.json", {"x": 1})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        with pytest.raises(TypeError):
            runs.write_atomic(tmp_path / "b.json", None)  # fails while writing
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_full_disk_is_one_line_naming_the_file_and_the_stage_is_not_accepted(tmp_path, monkeypatch):
    """The OSError of a full disk names no file; the run stops with one line that does, leaves no temporary file,
    and the stage whose stage.json could not be written is computed again next time, never read half-written."""
    real_fdopen, full, computed = os.fdopen, [False], []

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **kw: FullDisk(real_fdopen(fd, *a, **kw)) if full[0]
                        else real_fdopen(fd, *a, **kw))

    run = types.SimpleNamespace(args=types.SimpleNamespace(force=False), root=tmp_path / "run", started={},
                                code={"code": "c"})

    def stage():  # main()'s guard around a stage whose training fills the disk the first time
        done = runs.load_stage(run, "weak", "key")
        if done is not None:
            return done
        computed.append(1)
        full[0] = len(computed) == 1
        rows = common.prediction_rows([1.0, -1.0])
        return runs.save_stage(run, "weak", "key", common.accuracy([1.0, -1.0]), {"predictions.jsonl": rows})

    stage_dir = tmp_path / "run" / "weak"
    with pytest.raises(SystemExit) as info:
        stage()
    assert str(info.value).startswith(f"error: cannot write {stage_dir / 'predictions.jsonl'}: No space left on "
                                      "device") and "\n" not in str(info.value), str(info.value)
    assert list(stage_dir.iterdir()) == []  # no temporary file, no stage.json
    assert runs.find_cached(stage_dir, "weak", "key") is None
    full[0] = False  # space freed: the stage is computed again, then read from the cache
    assert stage()["accuracy"] == 0.5
    assert stage()["key"] == "key" and len(computed) == 2


def test_a_disk_that_fills_up_while_training_is_one_line(tmp_path):
    """The training log meets the full disk, where nothing catches the OSError: the run still ends with one line
    naming --out_dir instead of a traceback, and the stage it cut short leaves no stage.json."""
    out = tmp_path / "runs"
    argv = ["--data", "toy", "--n_gt", "8", "--n_w2s", "8", "--n_test", "8", "--n_extra", "0", "--settings", "none",
            "--weak", "tiny:1x32", "--strong", "tiny:1x32", "--batch_size", "8", "--micro_batch", "8",
            "--out_dir", str(out)]
    code = f"""if True:
        import builtins, errno, io
        import rm_w2s

        class FullDisk(io.StringIO):
            def write(self, text):
                raise OSError(errno.ENOSPC, "No space left on device")

        real_open = builtins.open
        builtins.open = lambda f, *a, **k: FullDisk() if str(f).endswith("metrics.jsonl") else real_open(f, *a, **k)
        rm_w2s.main({argv!r})
    """
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (f"error: No space left on device while writing a file under --out_dir "
                                                 f"{out}; free some space and run again (finished stages are kept)")
    assert list(out.glob("*/weak")) and not list(out.glob("*/weak/stage.json"))  # started, cut short, not accepted


def test_cache_digests_follow_code_models_and_what_a_stage_reads(tmp_path, tiny):
    code = tmp_path / "code.py"
    code.write_text("x = 1\n")
    before = runs.code_digest([code])
    code.write_text("x = 2\n")
    assert runs.code_digest([code])["code"] != before["code"]
    assert set(before["versions"]) == {"torch", "transformers"}
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    d0 = runs.model_digest(str(model))
    assert runs.model_digest(str(model)) == d0 and runs.model_digest("gpt2") == "gpt2"
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # new weights under the same path
    assert runs.model_digest(str(model)) != d0
    args = rm_w2s.Args()
    key = runs.options_key(args, model=d0, max_len=512, alpha=0.0, data="d", code="c")
    assert key == runs.options_key(dataclasses.replace(args, alpha=0.9, settings="none", n_extra=7, micro_batch=2),
                                 model=d0, max_len=512, alpha=0.0, data="d", code="c")  # what it does not read
    for change in ({"model": "other"}, {"alpha": 0.5}, {"data": "e"}, {"code": "changed"}):
        assert key != runs.options_key(args, **{**dict(model=d0, max_len=512, alpha=0.0, data="d", code="c"), **change})
    assert key != runs.options_key(dataclasses.replace(args, lr=2e-5), model=d0, max_len=512, alpha=0.0, data="d", code="c")


# ----------------------------------------------------------------------------------------------------
# the stage cache's code digest stops at common.py's measures

def test_code_digest_ignores_the_measures_and_nothing_else(tmp_path):
    """A stage's code digest covers common.py only above MEASURES_BANNER: a new measure re-trains nothing, while an
    edit above it (the training and scoring code) changes the digest."""
    text = Path(common.__file__).read_text()
    assert runs.MEASURES_BANNER in text
    top, measures = text.split(runs.MEASURES_BANNER, 1)
    (tmp_path / "c.py").write_text(text)
    base = runs.code_digest([tmp_path / "c.py"])
    (tmp_path / "c.py").write_text(top + runs.MEASURES_BANNER + measures + "\n\ndef a_new_measure():\n    return 1\n")
    assert runs.code_digest([tmp_path / "c.py"]) == base
    (tmp_path / "c.py").write_text(top.replace("def lr_at(", "def lr_at(  ", 1) + runs.MEASURES_BANNER + measures)
    assert runs.code_digest([tmp_path / "c.py"]) != base


# ----------------------------------------------------------------------------------------------------
# damaged files and odd places: one line, never a traceback

def run_script(args, cwd):
    """Run rm_w2s.py as a user would; returns (exit status, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "rm_w2s.py"), *map(str, args)],
                       cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_out_dir_under_a_file_is_one_line_before_anything_trains(tmp_path):
    (tmp_path / "some_file").write_text("x")
    rc, out, err = run_script(["--data", "toy", "--out_dir", tmp_path / "some_file" / "sub"], tmp_path)
    assert rc == 1 and err.strip().splitlines() == [f"error: --out_dir {tmp_path / 'some_file' / 'sub'}: "
                                                    f"{tmp_path / 'some_file'} is a file, not a folder"], err
    assert "Traceback" not in err and not (tmp_path / "some_file").is_dir()


def test_out_dir_not_writable_is_one_line(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere: check the rule on a folder whose access is refused by name
        with mock.patch("os.access", return_value=False):
            with pytest.raises(SystemExit) as info:
                runs.check_out_dir(tmp_path / "a" / "b")
        assert str(info.value) == f"error: --out_dir {tmp_path / 'a' / 'b'}: {tmp_path} is not writable by this user"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        rc, out, err = run_script(["--data", "toy", "--out_dir", locked / "runs"], tmp_path)
        assert rc == 1 and "is not writable" in err and "Traceback" not in err
    runs.check_out_dir(tmp_path / "new" / "deeper")  # a folder that can be created is fine, and is not created
    assert not (tmp_path / "new").exists()


def test_broken_gguf_is_one_line(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"garbage")  # 15 bytes: magic, version, garbage
    rc, out, err = run_script(["--data", "toy", "--n_gt", "8", "--n_w2s", "8", "--n_test", "8", "--n_extra", "0",
                               "--settings", "none", "--weak", broken, "--strong", "tiny:1x32",
                               "--out_dir", tmp_path / "runs"], tmp_path)
    lines = err.strip().splitlines()
    assert rc == 1 and "Traceback" not in err, err
    assert lines[-1].startswith(f"error: {broken}: not a readable GGUF model ("), err
    assert not list((tmp_path / "runs" / "models").glob("broken*"))  # no half-converted folder left


def test_bom_prefixed_data_file_reads_the_same_pairs(tmp_path):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}]
    text = "".join(json.dumps(r) + "\r\n" for r in rows)
    (tmp_path / "plain.jsonl").write_text(text)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert common.read_pairs(tmp_path / "bom.jsonl") == common.read_pairs(tmp_path / "plain.jsonl") == rows


def test_damaged_source_json_reconverts_with_a_line(tmp_path, capsys):
    import pretrained
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "source.json").write_text('{"sha256": ')
    assert pretrained.converted_from(folder) is None
    assert f"warning: {folder / 'source.json'} is damaged" in capsys.readouterr().out
    (folder / "source.json").write_text('{"sha256": "abc"}\n')
    assert pretrained.converted_from(folder) == "abc"
    assert pretrained.converted_from(tmp_path / "none") is None
