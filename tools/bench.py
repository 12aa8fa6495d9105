"""make bench: one fixed workload and one report line to time each method's preference training.

A method script's `--bench` option calls `bench(method, args)` with the script's own module: one epoch of its
own `train_preferences` (DPO: the reference log-probs included) on `workload(args)`, timed, at its --precision,
then `report(...)`: pairs/s, real tokens/s, the padding share of computed tokens, peak memory and the fraction
of the in-run matmul peak that training reaches (bf16 where the chip computes it natively, else fp32; on CUDA
also MFU). The SFT warm start is not timed.
docs/speed.md holds the measured numbers. Nothing here runs at import time.
"""
import dataclasses
import random
import tempfile
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and the method scripts: one folder up

import common
import runs
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
    if args.bench_model.startswith("random:"):
        print(f"[bench] model: {args.bench_model} (random weights)")
        return pairs, random_model(args.bench_model.split(":", 1)[1], texts_of(pairs), Path(args.out_dir) / "models")
    if args.bench_model:
        print(f"[bench] model: {args.bench_model}")
        return pairs, runs.converted(args.bench_model, Path(args.out_dir) / "models")  # NAME:firstK, .gguf
    model_path = toy.build_tiny(BENCH_SPEC, texts_of(pairs), Path(args.out_dir) / "models", seed=0, vocab_size=BENCH_VOCAB)
    return pairs, model_path


def texts_of(pairs):
    return [t for p in pairs for t in (p["chosen"], p["rejected"])]


# The published GPT-2 shapes (vocabulary 50257, 1024 positions) that `--bench_model random:NAME` builds
GPT2_SHAPES = {"gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20), "gpt2-xl": (48, 1600, 25)}


def random_model(name, texts, root):
    """A GPT-2 of the published shape `name` with random weights, and a BPE tokenizer of BENCH_VOCAB tokens trained on
    `texts`, saved under `root`: a GPU's timing of that model needs no download (the time does not depend on the
    weights). make bench-gpu benches random:gpt2-xl. Returns the path."""
    if name not in GPT2_SHAPES:
        raise SystemExit(f"error: --bench_model random:NAME takes one of {', '.join(GPT2_SHAPES)}, got {name!r}")
    from transformers import GPT2Config, GPT2LMHeadModel
    path = Path(root) / f"random-{name}"
    if not (path / "config.json").exists():
        n_layer, n_embd, n_head = GPT2_SHAPES[name]
        tok = toy.train_tokenizer(texts, BENCH_VOCAB)
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=50257, n_positions=1024, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        GPT2LMHeadModel(config).save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def bench(method, args):
    """Time one epoch of `method`'s preference training (`method`: the rm_w2s, dpo_w2s or simpo_w2s module), and
    the peak a large matmul reaches on this machine in the same run, before and after it."""
    args = dataclasses.replace(args, epochs=1)
    pairs, model_path = workload(args)
    device = common.device()
    model, tok = method.load(model_path, args, device)
    encoded = method.encode(tok, pairs, args.max_len)
    targets = [1.0] * len(encoded)  # ground truth: chosen is better

    def epoch(pairs, log_dir):  # -> (examples, steps); the loop names its progress bar after log_dir
        log_dir.mkdir(exist_ok=True)
        return method.train_preferences(model, [encoded[i] for i in pairs], [targets[i] for i in pairs],
                                        pad_id=tok.pad_token_id, args=args, alpha=0.0, log_dir=log_dir)
    peak_dtype = "bf16" if common.resolve_precision("auto") == "bf16" else "fp32"
    peak = matmul_peak(device, peak_dtype)
    compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda" or compiled:  # kernels, the allocator and the compiler warm up, untimed, on a
            t0 = time.perf_counter()           # step of the shortest pairs and one of the longest: a compiled body
            by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0].ids) + len(encoded[i][1].ids))
            for pairs in (by_length[:args.batch_size], by_length[-args.batch_size:]):  # compiles a graph for each
                epoch(pairs, Path(tmp) / "warm-up")                                 # range of lengths it meets
            warm_up = time.perf_counter() - t0
            print(f"[bench] warm-up steps (untimed{', compiling the body' if compiled else ''}): {warm_up:.0f} s")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        examples, steps = epoch(range(len(encoded)), Path(tmp) / f"bench {method.METHOD} {args.precision}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = max(peak, matmul_peak(device, peak_dtype))
    real, computed = padded_tokens(steps, [common.row_lengths(common.example_texts(e), args.pack) for e in examples])
    return report(method.METHOD, args.precision, model, seconds, len(examples), real, computed, peak, peak_dtype)


def matmul_peak(device, dtype="bf16", n=None, repeats=5):
    """FLOP/s of the best of `repeats` n x n matmuls in `dtype` here and now: the peak that the fraction-of-peak
    figure divides by (a vendor's number means little on a shared machine). The caller asks for fp32 where the
    chip has no native bf16: emulated bf16 is no peak (about 13x slower than fp32 on an AVX2-only CPU)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype]))
            for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def padded_tokens(steps, row_lengths):
    """(real, computed) tokens of training micro-batches: each micro-batch is padded to its longest row;
    row_lengths[i] lists the lengths of the rows pair i takes in a forward (one when packed, else two)."""
    real = computed = 0
    for micro_batches in steps:
        for mb in micro_batches:
            lens = [n for i in mb for n in row_lengths[i]]
            real, computed = real + sum(lens), computed + len(lens) * max(lens)
    return real, computed


def report(method, precision, model, seconds, n_pairs, real, computed, peak, peak_dtype="bf16"):
    """Print and return the benchmark line: pairs/s, real tokens/s, padding share, peak memory, and the achieved
    training FLOP/s, 6 x non-embedding parameters x real tokens / time, as a fraction of the in-run matmul
    peak in `peak_dtype` (on CUDA also MFU against the chip's data sheet, 6 x all parameters, as measured before)."""
    import resource
    n_params = sum(p.numel() for p in model.parameters())
    n_embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    achieved = 6 * (n_params - n_embedding) * real / seconds
    row = {"method": method, "precision": precision, "pairs_per_s": n_pairs / seconds,
           "real_tokens_per_s": real / seconds, "padding_share": 1 - real / computed, "seconds": seconds,
           "params": n_params, "non_embedding_params": n_params - n_embedding, "train_flops_per_s": achieved,
           "matmul_peak_flops_per_s": peak, "peak_dtype": peak_dtype, "peak_fraction": achieved / peak}
    if torch.cuda.is_available():
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name()
        vendor = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        row["mfu"] = 6 * n_params * real / seconds / vendor if vendor else None
    else:
        row["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process RSS
    print(f"[bench] {method} {precision}: {row['pairs_per_s']:.2f} pairs/s, {row['real_tokens_per_s']:.0f} real "
          f"tokens/s, padding {row['padding_share']:.1%} of computed tokens, peak memory "
          f"{row['peak_memory_gib']:.2f} GiB, {achieved / 1e12:.3f} TFLOP/s = {row['peak_fraction']:.1%} of the "
          f"{peak / 1e12:.2f} TFLOP/s a {peak_dtype} matmul reaches here"
          + (f", MFU {row['mfu']:.1%}" if row.get("mfu") else "")
          + f", {n_params / 1e6:.1f}M params ({(n_params - n_embedding) / 1e6:.1f}M non-embedding)")
    return row
