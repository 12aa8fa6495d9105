"""Time (or profile) a method's training steps on SmolLM2, bf16, after two warm-up steps: python results/speed-cpu/steps.py REPO [--compile on|off|none] [--steps N] [--micro 8] [--profile [--kprof]] [--sync DIR: start timing when two processes are ready]"""
import argparse, os, resource, sys, time
from pathlib import Path
p = argparse.ArgumentParser(); p.add_argument("repo"); p.add_argument("--compile", default="on"); p.add_argument("--steps", type=int, default=3)
p.add_argument("--profile", action="store_true"); p.add_argument("--micro", type=int, default=8); p.add_argument("--model", default="models/smollm2-135m-instruct")
p.add_argument("--kprof", action="store_true"); p.add_argument("--sync", default=""); p.add_argument("--method", default="rm")
a = p.parse_args()
sys.path.insert(0, os.path.abspath(a.repo)); os.chdir(a.repo)
import torch
if a.kprof:
    import torch._inductor.config as ic; ic.cpp.enable_kernel_profile = True
import common, runs
mod = __import__(f"{a.method}_w2s")
args = runs.parse_args(mod.Args, ["--data", "../shared/data/hh-single-turn", "--precision", "bf16", "--micro_batch", str(a.micro)] + (["--compile", a.compile] if a.compile != "none" else []))
device, autocast = common.device(), common.autocast("bf16")
model, tok = mod.load(a.model, args, device)
pairs = common.read_jsonl("../shared/data/hh-single-turn/harmless_train_gt.jsonl")[:32 * (a.steps + 1)]
enc = mod.encode(tok, pairs, args.max_len)
def run(n, log_dir=Path("/tmp/prof")):
    log_dir.mkdir(exist_ok=True)
    return mod.train_preferences(model, enc[:n], [1.0] * n, pad_id=tok.pad_token_id, args=args,
                                 alpha=0.0, log_dir=log_dir)
t0 = time.perf_counter(); run(32); print(f"warm {time.perf_counter()-t0:.1f}s", flush=True)
t0 = time.perf_counter(); run(32); print(f"warm2 {time.perf_counter()-t0:.1f}s", flush=True)
if a.sync:
    import glob
    open(f"{a.sync}/{os.getpid()}", "w").close()
    while len(glob.glob(f"{a.sync}/*")) < 2: time.sleep(1)
if a.profile:
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run(32)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=40, max_shapes_column_width=90))
else:
    t0 = time.perf_counter(); run(32 * a.steps); dt = time.perf_counter() - t0
    print(f"RESULT {a.repo} compile={a.compile} micro={a.micro}: {32*a.steps/dt:.2f} pairs/s ({dt:.1f}s) rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20:.2f} GiB", flush=True)
