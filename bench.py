"""make bench: one fixed workload and one report line to time each method's training stage.

Each method script's `--bench` option (its `bench(args)`) trains one epoch on `workload(args)` with its own
`train` and prints `report(...)`: pairs/s, real tokens/s, the padding share of computed tokens, peak memory
and, on CUDA, MFU. README "Speed" holds the measured numbers. Nothing here runs at import time.
"""
import random
from pathlib import Path

import torch

import common
import toy

BENCH_PAIRS, BENCH_SPEC, BENCH_VOCAB = 256, "tiny:4x256", 2048
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per the vendors' data sheets


def workload(args):
    """The benchmark workload: the first 256 pairs of the paper's gt file (synthetic HH-like pairs of a
    similar length distribution where it is absent) and a GPT-2 of 4 layers, width 256, BPE vocabulary 2048
    built on them (or --bench_model)."""
    path = Path(args.data) / "harmless_train_gt.jsonl"
    if path.exists():
        pairs = common.read_jsonl(path)[:BENCH_PAIRS]
        print(f"[bench] data: first {len(pairs)} pairs of {path}")
    else:
        rng = random.Random(0)  # median ~170 characters per text, a long tail, like the real file
        words = lambda k: " ".join(rng.choice(toy.TOY_FILLER) for _ in range(k))  # noqa: E731
        pairs = [{"chosen": f"{common.HUMAN} {words(int(rng.lognormvariate(2.4, 0.6)))}{common.ASSISTANT} {words(a)}",
                  "rejected": f"{common.HUMAN} {words(8)}{common.ASSISTANT} {words(b)}"} for _ in range(BENCH_PAIRS)
                 for a, b in [(int(rng.lognormvariate(3.0, 0.8)) + 1, int(rng.lognormvariate(3.0, 0.8)) + 1)]]
        for p in pairs:
            p["rejected"] = common.split_prompt(p["chosen"]).prompt + common.split_prompt(p["rejected"]).response
        print(f"[bench] data: {path} not found, {len(pairs)} synthetic pairs")
    if args.bench_model:
        print(f"[bench] model: {args.bench_model}")
        return pairs, args.bench_model
    texts = [t for p in pairs for t in (p["chosen"], p["rejected"])]
    model_path = toy.build_tiny(BENCH_SPEC, texts, Path(args.out_dir) / "models", seed=0, vocab_size=BENCH_VOCAB)
    return pairs, model_path


def padded_tokens(steps, row_lengths):
    """(real, computed) tokens of training micro-batches: each micro-batch is padded to its longest row;
    row_lengths[i] lists the lengths of the rows pair i takes in a forward (one when packed, else two)."""
    real = computed = 0
    for micro_batches in steps:
        for mb in micro_batches:
            lens = [n for i in mb for n in row_lengths[i]]
            real, computed = real + sum(lens), computed + len(lens) * max(lens)
    return real, computed


def report(method, model, seconds, n_pairs, real, computed, extra=""):
    """Print and return the benchmark line: pairs/s, real tokens/s, padding share, peak memory, MFU."""
    import resource
    n_params = sum(p.numel() for p in model.parameters())
    row = {"method": method, "pairs_per_s": n_pairs / seconds, "real_tokens_per_s": real / seconds,
           "padding_share": 1 - real / computed, "seconds": seconds, "params": n_params}
    if torch.cuda.is_available():
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        row["mfu"] = 6 * n_params * real / seconds / peak if peak else None
    else:
        row["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process RSS
    print(f"[bench] {method}: {row['pairs_per_s']:.1f} pairs/s, {row['real_tokens_per_s']:.0f} real tokens/s, "
          f"padding {row['padding_share']:.1%} of computed tokens, peak memory {row['peak_memory_gib']:.2f} GiB"
          + (f", MFU {row['mfu']:.1%}" if row.get("mfu") else "") + f", {n_params / 1e6:.1f}M params{extra}")
    return row

