"""Several processes: the scripts under `torchrun --nproc_per_node 2` (FSDP, gloo backend, CPU) against one process.

Every test starts real torchrun processes (`python -m torch.distributed.run`), as a user does; this file is
also the worker of the gradient test (`python test_dist.py grad ...`, run plainly and under torchrun).
Tolerances: the ranks add the same numbers in another order, so values agree up to float rounding.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import common
import dpo_w2s
import rm_w2s
import toy
from test_e2e import data_dir  # noqa: F401 (the fixture: the shared data, or synthetic pairs where it is absent)

HERE = Path(__file__).resolve().parents[1]  # the repository
SMALL = ["--n_gt", "16", "--n_w2s", "16", "--n_test", "16", "--weak", "tiny:1x32", "--strong", "tiny:1x32",
         "--batch_size", "6", "--micro_batch", "2", "--settings", "none,explicit",  # 3 micro-batches a step: uneven
         "--precision", "fp32"]  # compared with one process to float rounding: bf16 would round the differences up


def launch(args, nproc=None, timeout=300):
    """Run a script (a path from the repository) in one process (nproc None) or under torchrun; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    prefix = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(prefix + [str(a) for a in args], cwd=HERE, env=env, capture_output=True, text=True,
                          timeout=timeout)


def launch_run(argv, nproc):
    """A script's whole run under torchrun. gloo's C++ threads, still alive at the interpreter's exit, sometimes
    abort a rank with SIGABRT after everything is written (pytorch/pytorch#190489; seen in loaded full suites: once
    in ~20 in the gradient test, once here): when a run printed its report and then lost a rank to that signal, the
    same command runs once more, and must find every stage done and exit cleanly. Any other failure, or the abort
    twice, fails the test."""
    result = launch(argv, nproc=nproc)
    if result.returncode != 0 and "Signal 6 (SIGABRT)" in result.stderr and "Knowledge space" in result.stdout:
        warnings.warn("a rank aborted at exit after the report (gloo teardown); running once more:\n"
                      + result.stderr[-1500:])
        again = launch(argv, nproc=nproc)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "Knowledge space" in again.stdout and "cached in" in again.stdout
        return subprocess.CompletedProcess(again.args, 0, result.stdout, again.stderr)  # the first run's report
    return result


def test_launch_run_runs_again_only_after_an_abort_at_exit(monkeypatch):
    report, abort = "== Knowledge space ==", "exitcode  : -6\n  traceback : Signal 6 (SIGABRT) received by PID 7"
    def calls(*results):
        queue = list(results)
        monkeypatch.setattr(sys.modules[__name__], "launch", lambda argv, nproc=None: queue.pop(0))
        return queue
    def done(out, err="", rc=0):
        return subprocess.CompletedProcess(["torchrun"], rc, out, err)
    queue = calls(done(report, abort, -6), done("cached in ...\n" + report))
    with pytest.warns(UserWarning, match="aborted at exit"):
        result = launch_run(["x.py"], nproc=2)
    assert result.returncode == 0 and result.stdout == report and queue == []
    calls(done("", abort, -6))  # aborted before the report: a failure, not run again
    assert launch_run(["x.py"], nproc=2).returncode == -6
    calls(done(report, "Traceback ...", 1))  # another failure after the report: not run again
    assert launch_run(["x.py"], nproc=2).returncode == 1
    calls(done(report, abort, -6), done(report, abort, -6))  # the abort twice fails the test
    with pytest.warns(UserWarning), pytest.raises(AssertionError):
        launch_run(["x.py"], nproc=2)


def run_folder(out_dir):
    [root] = [p for p in Path(out_dir).iterdir() if p.name != "models"]
    return root


def margins(stage_dir):
    return [row["margin"] for row in common.read_jsonl(stage_dir / "predictions.jsonl")]


@pytest.mark.parametrize("method, args", [("rm", []), ("dpo", ["--sft_epochs", "1"])])
def test_two_ranks_give_the_one_process_margins(method, args, data_dir, tmp_path):
    argv = [f"{method}_w2s.py", "--data", data_dir, *SMALL, "--lr", "1e-3", *args]
    one = launch(argv + ["--out_dir", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch_run(argv + ["--out_dir", tmp_path / "two"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = run_folder(tmp_path / "one"), run_folder(tmp_path / "two")
    assert a.name == b.name  # the same configuration: the world size is not an option of the run
    stages = ("weak", "strong", "student-none", "student-explicit")
    for stage in stages:
        x, y = margins(a / stage), margins(b / stage)
        scale = max(1.0, max(abs(v) for v in x))
        assert len(x) == len(y) == 16
        assert max(abs(u - v) for u, v in zip(x, y)) <= 1e-5 * scale, (stage, x, y)
        # rank 0 alone wrote each file, once and whole: the same files as one process, no temporary file left
        assert sorted(p.name for p in (a / stage).iterdir()) == sorted(p.name for p in (b / stage).iterdir())
    assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())
    for stage in stages:  # the training curves are the same curves (the loss of every step, summed over ranks)
        one_losses = [r["loss"] for r in common.read_jsonl(a / stage / "metrics.jsonl")]
        two_losses = [r["loss"] for r in common.read_jsonl(b / stage / "metrics.jsonl")]
        assert len(one_losses) == len(two_losses) and max(abs(u - v) for u, v in zip(one_losses, two_losses)) < 1e-5
    print(f"[{method}] 2 ranks against 1 process: max |margin difference| "
          f"{max(abs(u - v) for s in stages for u, v in zip(margins(a / s), margins(b / s))):.3g}")
    assert two.stdout.count("Knowledge space") == 1  # rank 0 alone prints the report
    if method == "rm":  # the stage cache under torchrun: a second run finds every stage done
        again = launch_run(argv + ["--out_dir", tmp_path / "two"], nproc=2)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.count("cached in") == len(stages)


@pytest.mark.parametrize("method", ["rm", "dpo"])
def test_one_step_gradient_on_two_ranks_equals_one_process(method, data_dir, tmp_path):
    """The gradient the script's own train() hands to the optimizer, for one step of 3 micro-batches (2 on
    rank 0, 1 and a repeat with grad_scale 0 on rank 1), is the one-process gradient."""
    pairs = common.read_pairs(Path(data_dir) / "harmless_train_gt.jsonl")[:6]
    texts = [t for p in pairs for t in (p["chosen"], p["rejected"])]
    model = toy.build_tiny("tiny:2x32", texts, tmp_path / "models", seed=0)
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    worker = [Path(__file__), "grad", method, model, tmp_path / "pairs.json"]
    one = launch(worker + [tmp_path / "one.pt"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(worker + [tmp_path / "two.pt"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    g1, g2 = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert g1.keys() == g2.keys() and len(g1) > 10
    size = max(float(g.abs().max()) for g in g1.values())
    worst = max(float((g1[k] - g2[k]).abs().max()) for k in g1)
    print(f"[{method}] one-step gradient, 2 ranks against 1 process: max |difference| {worst:.3g} (max |g| {size:.3g})")
    assert size > 1e-4  # a gradient that is there
    assert worst <= 1e-5 * size


def test_a_failing_rank_ends_the_run_and_leaves_no_stage(data_dir, tmp_path):
    """Rank 1 fails while the weak ceiling trains: torchrun ends every rank, the error is shown, the stage
    leaves no stage.json and the run no results."""
    out = tmp_path / "out"
    two = launch([Path(__file__), "fail", "--data", data_dir, *SMALL, "--out_dir", out], nproc=2)
    assert two.returncode != 0
    assert "injected failure on rank 1" in two.stderr
    root = run_folder(out)
    assert not (root / "weak" / "stage.json").exists() and not (root / "results.json").exists()


def test_fsdp_cpu_offload_needs_torchrun(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="--fsdp_cpu_offload shards with FSDP, which needs torchrun"):
        rm_w2s.main(["--data", str(data_dir), *SMALL, "--out_dir", str(tmp_path), "--fsdp_cpu_offload"])


# ----------------------------------------------------------------------------------------------------
# the worker processes

class RecordingOptimizer(torch.optim.SGD):
    """Stands in for AdamW inside a script's train(): keeps the first step's full gradients, moves nothing."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, lr=0.0)
        self.grads = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.grads is None:
            self.grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                          for g in self.param_groups for p in g["params"]]


def gradient_worker(method, model_path, pairs_file, out_file):
    """One optimizer step of the script's train() on 6 pairs (batch 6, micro-batch 2) with the explicit term on,
    after a scoring pass under no_grad (as in the scripts); rank 0 saves {parameter name: gradient}."""
    import tempfile
    common.init_distributed()
    torch.manual_seed(0)
    pairs = json.loads(Path(pairs_file).read_text())
    device, autocast = common.device(), common.autocast("fp32")
    tok = common.load_tokenizer(model_path)
    recorded = {}
    common.make_optimizer = lambda params, *a: recorded.setdefault("opt", RecordingOptimizer(params))
    log_dir = Path(tempfile.mkdtemp())
    if method == "rm":
        from transformers import AutoModel
        model = rm_w2s.RewardModel(common.load_model(model_path, AutoModel, tok, device))
        torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head (the default) passes no gradient to the body
        model = common.shard(model) if common.world_size() > 1 else model
        args = rm_w2s.Args(batch_size=6, micro_batch=2, lr=1e-3, group_by_length=False, log_every=1000,
                           precision="fp32")
        encoded = rm_w2s.encode(tok, pairs, 128)
        model.eval()
        rm_w2s.score_pairs(model, encoded, tok.pad_token_id, 2, autocast)  # a scoring pass first, as --eval_every does
        examples = [{"chosen": c, "rejected": r, "target": p, "chosen_first": i % 2 == 0}  # ground-truth orientation
                    for i, ((c, r), p) in enumerate(zip(encoded, [0.9, 0.2, 0.6, 0.7, 0.1, 0.8]))]
        rm_w2s.train(model, examples, pad_id=tok.pad_token_id, alpha=0.5, args=args, log_dir=log_dir)
    else:
        from transformers import AutoModelForCausalLM
        model = common.load_model(model_path, AutoModelForCausalLM, tok, device, pack=True)
        model = common.shard(model) if common.world_size() > 1 else model
        args = dpo_w2s.Args(batch_size=6, micro_batch=2, lr=1e-3, group_by_length=False, log_every=1000,
                            precision="fp32")
        encoded = common.encode_pairs(tok, pairs, 128)
        model.eval()
        ref = common.pair_logps(model, encoded, tok.pad_token_id, 2, autocast)  # the reference pass, as the script
        examples = [{"chosen": c, "rejected": r, "gt_agree": i % 3 != 0, "ref_chosen": ref_c.sum + i, "ref_rejected": ref_r.sum}
                    for i, ((c, r), (ref_c, ref_r)) in enumerate(zip(encoded, ref))]  # + i: DPO logits away from 0
        dpo_w2s.train(model, examples, pad_id=tok.pad_token_id, alpha=0.5, args=args, log_dir=log_dir)  # beta 0.1
    names = [name for name, _ in model.named_parameters()]
    if common.rank() == 0:
        torch.save(dict(zip(names, recorded["opt"].grads)), out_file)
    common.barrier()  # both ranks end together, as the scripts' runs.report makes them
    # The saved gradients are this worker's whole result. It leaves without the interpreter's teardown: there,
    # gloo's C++ threads still alive sometimes abort a rank ("terminate called without an active exception",
    # seen once in ~20 runs, only in a loaded full suite; pytorch/pytorch#190489) after the file is written,
    # which is not what this test checks. The scripts' own exit under torchrun is checked by the margins test.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def failing_worker(argv):
    """rm_w2s.main(argv), with rank 1's training loop raising at once."""
    common.init_distributed()
    if common.rank() == 1:
        def fail(*args, **kwargs):
            raise RuntimeError("injected failure on rank 1")
        rm_w2s.train = fail
    rm_w2s.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "grad":
        gradient_worker(*sys.argv[2:6])
    elif sys.argv[1] == "fail":
        failing_worker(sys.argv[2:])
