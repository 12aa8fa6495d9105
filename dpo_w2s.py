"""Weak-to-strong deception with DPO.

The DPO experiment of "Super(ficial)-alignment: Strong Models May Deceive Weak Models in Weak-to-Strong
Generalization" (Yang et al., arXiv 2406.11431): the policy itself is the model of preference.

  every model:       SFT on the chosen responses of its training pairs, then DPO (Rafailov et al. 2023, eq. 7)
                     -log sigmoid(beta * ((log π(c) - log π(r)) - (log π_ref(c) - log π_ref(r))))
                     with π_ref = the SFT model, frozen; summed response log-probs;
  preference:        a model prefers the response with the larger summed log-likelihood log π(y | x);
  1. weak ceiling:   the weak model on ground truth; its preferences on the weak-to-strong split are the
                     (hard) weak labels, its margin their confidence;
  2. strong ceiling: the strong model on ground truth;
  3. students:       the strong model, fresh, on the weak labels: none | implicit (+ ground-truth helpfulness
                     pairs) | explicit (+ alpha * DPO's loss towards the ground-truth rejected response);
  4. report:         accuracy, implicit-reward accuracy, PGR, knowledge space and deception score.

Run:
  make dpo STRONG=gpt2-xl WEAK=gpt2
  python dpo_w2s.py --weak gpt2 --strong gpt2-medium --data hh --settings none,explicit
"""
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import bench
import common


@dataclass
class Args:
    # data
    data: str = "hh"  # hh | cai | toy | a directory with the paper's harmless_*.jsonl files
    n_gt: int = 4000  # ground-truth pairs: train the weak and strong ceilings
    n_w2s: int = 4000  # weak-to-strong pairs: labelled by the weak ceiling, train the students
    n_test: int = 4000  # test pairs: accuracy and the knowledge-space analysis
    n_extra: int = 4000  # helpfulness pairs with ground-truth labels for the implicit conflict
    helpful: str = ""  # a jsonl of helpfulness pairs (default: the Hub's hh-rlhf helpful-base)
    # models
    weak: str = "gpt2"  # Hub id, local path, or tiny:LxD (a random-init GPT-2 built locally)
    strong: str = "gpt2-medium"  # the same kinds as --weak
    intermediate: str = ""  # bootstrapping: weak -> intermediate -> strong (empty: off)
    max_len: int = 512  # tokens per prompt + response (capped by the model's maximum positions)
    weak_max_len: int = 0  # a shorter reading window for the weak model alone (0: max_len)
    # optimization
    lr: float = 1e-6  # DPO learning rate (the paper's scripts)
    batch_size: int = 32  # pairs per optimizer step
    micro_batch: int = 8  # pairs per forward; gradients accumulate up to batch_size
    epochs: int = 3  # DPO epochs
    warmup_ratio: float = 0.1  # share of DPO steps with linear warm-up, then constant
    sft_lr: float = 0.0  # SFT learning rate, warm-up then constant (0: the same as --lr, as the paper's scripts)
    sft_epochs: int = 1  # SFT epochs on the chosen responses before DPO (0: none)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 0.0  # max gradient norm (0: no clipping, as the paper's code)
    grad_ckpt: bool = False  # gradient checkpointing (less memory, ~30% slower)
    fsdp_cpu_offload: bool = False  # under torchrun: FSDP keeps parameters, gradients and optimizer state in CPU memory
    group_by_length: bool = True  # micro-batches of similar length (--no_group_by_length: shuffled only)
    pack: bool = True  # a pair's two texts share one row in training (--no_pack: a row per text, more padding)
    # method
    beta: float = 0.1  # DPO's KL weight
    settings: str = "none,implicit,explicit"  # which students to train
    alpha: float = 0.5  # weight of the explicit-conflict term
    conf_threshold: float = 0.0  # train students only on pairs with weak confidence >= this (0: all)
    conf_scale: float = 50.0  # confidence = sigmoid(|summed log-likelihood ratio| / conf_scale) (the paper's: 50)
    drop_weak_errors: bool = False  # also drop pairs the weak model got wrong (reads ground truth!)
    # io
    seed: int = 0  # one seed for data order and batching
    out_dir: str = "runs"  # run folders go here
    log_every: int = 10  # optimizer steps between log lines
    eval_every: int = 0  # students: score the test split every this many optimizer steps into eval_curve.jsonl (0: off)
    force: bool = False  # re-run stages even if cached
    bench: bool = False  # only time one epoch of training on the fixed benchmark workload (make bench)
    bench_model: str = ""  # with --bench: time this model (Hub id or path) instead of the 4-layer GPT-2 built here


# ----------------------------------------------------------------------------------------------------
# losses: pure functions, per-example values (the caller reduces)

def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))).

    pi_c, pi_r: (B,) summed response log-probs of the chosen / rejected response under the policy;
    ref_c, ref_r: (B,) the same under the reference. Returns (losses (B,), chosen_rewards (B,),
    rejected_rewards (B,)), the implicit rewards beta * (log π - log π_ref) detached."""
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    losses = -F.logsigmoid(beta * logits)
    return losses, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


def dpo_conflict_loss(pi_c, pi_r, ref_c, ref_r, gt_agree, beta):
    """Explicit conflict: DPO's own loss written towards the ground-truth REJECTED response, counted only
    on pairs where the policy currently prefers that response (larger summed log-likelihood; a tie counts).

    Inputs are in the weak orientation (c = the weak-chosen response); gt_agree (B,) bool says whether the
    weak label matches the ground truth. The term is -log sigmoid(beta * (ρ_ref - ρ_π)) in the weak
    orientation when the weak label is right and the mirror image when it is wrong (ρ = log-ratio chosen
    over rejected). This is the only place a student sees ground truth. Returns (B,)."""
    gt_c, gt_r = torch.where(gt_agree, pi_c, pi_r), torch.where(gt_agree, pi_r, pi_c)  # ground-truth orientation
    ref_gt_c, ref_gt_r = torch.where(gt_agree, ref_c, ref_r), torch.where(gt_agree, ref_r, ref_c)
    m = (gt_c <= gt_r).float().detach()  # the policy prefers the ground-truth rejected response
    losses, _, _ = dpo_loss(gt_r, gt_c, ref_gt_r, ref_gt_c, beta)
    return m * losses


# ----------------------------------------------------------------------------------------------------
# training loop: one loop for the SFT warm start and for DPO, told apart by `batch_loss`

def train(model, examples, batch_loss, *, units, lr, epochs, args, log_path, autocast, desc, evaluate=None):
    """Optimise `batch_loss(batch) -> (loss summed over the batch, {metric: sum over pairs})` over `examples`
    (dicts with "chosen" and, for DPO, "rejected", "ref_chosen", "ref_rejected", "gt_agree": see common.py) for
    `epochs`, with a linear warm-up then a constant learning rate (the paper's schedule). `units(example)` is
    the loss's unit count (1 per pair for DPO, response tokens for SFT). evaluate(step, examples_seen), if given,
    runs every args.eval_every steps and at the last one. Returns the steps."""
    device = common.device_and_autocast()[0]
    lengths = [max(common.row_lengths(common.example_texts(e), args.pack)) for e in examples]
    steps = [s for epoch in range(epochs) for s in
             common.make_batches(lengths, args.batch_size, args.micro_batch, args.seed + epoch, args.group_by_length)]
    optimizer = common.make_optimizer(model.parameters(), lr, args.weight_decay)
    model.train()  # dropout is already 0; train mode keeps gradient checkpointing on
    log = open(log_path if common.rank() == 0 else os.devnull, "w")  # torchrun: rank 0 writes
    bar = tqdm(steps, desc=desc, dynamic_ncols=True, disable=common.rank() != 0)
    examples_seen = 0
    for step, micro_batches in enumerate(bar):
        step_lr = common.lr_at(step, len(steps), lr, args.warmup_ratio, "constant")
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        n_units = sum(units(examples[i]) for mb in micro_batches for i in mb)
        n_pairs = sum(len(mb) for mb in micro_batches)
        loss_sum, sums = torch.zeros((), device=device), {}
        for mb, weight in common.rank_share(micro_batches):  # one process: all of them, weight 1 (torchrun: common.py)
            with autocast():
                loss, metrics = batch_loss([examples[i] for i in mb])
            # each backward adds gradients, so normalise by the units of the whole optimizer step: an uneven last
            # micro-batch then weighs what its pairs (or tokens) weigh
            (weight * loss / n_units).backward()
            loss_sum += (weight > 0) * loss.detach()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + (weight > 0) * v
        totals = common.sum_over_ranks(torch.stack([loss_sum, *sums.values()]))
        loss_sum, sums = totals[0], dict(zip(sums, totals[1:]))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))  # inf: measure only
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        examples_seen += n_pairs
        row = {"step": step + 1, "examples_seen": examples_seen, "loss": float(loss_sum) / n_units,
               **{k: float(v) / n_pairs for k, v in sums.items()}, "grad_norm": float(grad_norm), "lr": step_lr}
        common.check_step_loss(row["loss"], desc, step + 1)
        log.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.3f}")
        if (step + 1) % args.log_every == 0 or step + 1 == len(steps):
            log.flush()
            tqdm.write(f"{desc} step {step + 1}/{len(steps)} " + " ".join(
                f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "examples_seen")))
        if evaluate and ((step + 1) % args.eval_every == 0 or step + 1 == len(steps)):
            evaluate(step + 1, examples_seen)  # scores under no_grad: the training itself is unchanged
    log.close()
    return steps


def dpo_batch_loss(model, pad_id, beta, alpha, pack):
    """DPO's batch_loss for train(): the policy's summed response log-probs of each pair's chosen and rejected
    texts in one forward, against the reference's, plus alpha * the explicit-conflict term."""
    def batch_loss(batch):
        texts = [t for e in batch for t in (e["chosen"], e["rejected"])]
        logps = common.forward_logps(model, texts, pad_id, pack).sum  # (2B,) summed: DPO's log π(y | x)
        pi_c, pi_r = logps[0::2], logps[1::2]  # chosen, rejected, chosen, ... in one forward
        ref_c = torch.tensor([e["ref_chosen"] for e in batch], device=logps.device)  # (B,)
        ref_r = torch.tensor([e["ref_rejected"] for e in batch], device=logps.device)  # (B,)
        losses, chosen_rewards, rejected_rewards = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
        if alpha:
            gt_agree = torch.tensor([e["gt_agree"] for e in batch], device=logps.device)
            losses = losses + alpha * dpo_conflict_loss(pi_c, pi_r, ref_c, ref_r, gt_agree, beta)
        return losses.sum(), {
            "rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": pi_c.detach().sum(), "logps/rejected": pi_r.detach().sum()}
    return batch_loss


def one_per_pair(example):
    """DPO's loss unit: the pair."""
    return 1


# ----------------------------------------------------------------------------------------------------
# one stage: SFT, then DPO a fresh policy, then predict

def train_and_predict(stage_dir, *, model_path, max_len, pairs, targets, test_pairs, label_pairs, args, alpha,
                      evaluate=None):
    """SFT then DPO a fresh policy from `model_path` on `pairs`, turned so that chosen is what the labeller
    prefers (hard labels: targets > 0.5), write its test predictions and, if label_pairs is given, its labels on
    them. Returns the stage summary."""
    common.seed_everything(args.seed)
    device, autocast = common.device_and_autocast()
    tok = common.load_tokenizer(model_path)
    model = common.load_model(model_path, AutoModelForCausalLM, tok, device, args.grad_ckpt, args.pack)
    model = common.shard(model, args.fsdp_cpu_offload)  # torchrun: FSDP over the ranks; one process: unchanged
    max_len = min(max_len, common.model_max_len(model.config) or max_len)
    pad = tok.pad_token_id
    oriented_pairs, gt_agree = common.orient(pairs, targets)
    train_encoded = common.encode_pairs(tok, oriented_pairs, max_len)
    test_encoded = common.encode_pairs(tok, test_pairs, max_len)

    if args.sft_epochs:  # SFT on the responses its labeller prefers
        train(model, [{"chosen": c} for c, _ in train_encoded], common.sft_loss(model, pad),
              units=common.response_tokens, lr=args.sft_lr or args.lr, epochs=args.sft_epochs, args=args,
              log_path=stage_dir / "sft_metrics.jsonl", autocast=autocast, desc=f"{stage_dir.name} sft")
    # The reference is the SFT model, frozen: its log-probs are computed once per dataset here, before DPO
    # changes the weights, so no second model sits in memory while training, and its dropout can never be on.
    model.eval()
    ref_train = common.pair_logps(model, train_encoded, pad, args.micro_batch, autocast)
    ref_test = common.pair_logps(model, test_encoded, pad, args.micro_batch, autocast)
    examples = [{"chosen": c, "rejected": r, "gt_agree": agree, "ref_chosen": ref_c.sum, "ref_rejected": ref_r.sum}
                for (c, r), (ref_c, ref_r), agree in zip(train_encoded, ref_train, gt_agree)]
    def test_margins():  # the policy's preference: the larger summed log-likelihood
        return [c.sum - r.sum for c, r in common.pair_logps(model, test_encoded, pad, args.micro_batch, autocast)]
    train(model, examples, dpo_batch_loss(model, pad, args.beta, alpha, args.pack), units=one_per_pair,
          lr=args.lr, epochs=args.epochs, args=args, log_path=stage_dir / "metrics.jsonl", autocast=autocast,
          desc=f"{stage_dir.name} dpo", evaluate=evaluate and (lambda step, seen: evaluate(step, seen, test_margins())))

    model.eval()
    policy_test = common.pair_logps(model, test_encoded, pad, args.micro_batch, autocast)
    margins = [c.sum - r.sum for c, r in policy_test]
    implicit = [(c.sum - ref_c.sum) - (r.sum - ref_r.sum) for (c, r), (ref_c, ref_r) in zip(policy_test, ref_test)]
    rows = common.prediction_rows(margins)
    for row, m in zip(rows, implicit):
        row.update(implicit_margin=m, implicit_correct=m > 0)
    common.write_jsonl(stage_dir / "predictions.jsonl", rows)
    summary = {**common.accuracy(margins), "implicit_accuracy": common.accuracy(implicit)["accuracy"]}
    if label_pairs is not None:
        label_logps = common.pair_logps(model, common.encode_pairs(tok, label_pairs, max_len), pad, args.micro_batch,
                                        autocast)
        label_margins = [c.sum - r.sum for c, r in label_logps]
        common.write_jsonl(stage_dir / "labels.jsonl", common.label_rows(label_margins))
        summary["label_accuracy"] = common.accuracy(label_margins)["accuracy"]
    print(f"[{stage_dir.name}] test accuracy {summary['accuracy']:.4f} (ties {summary['ties']}), "
          f"implicit-reward accuracy {summary['implicit_accuracy']:.4f}")
    return summary


def run_bench(args):
    """make bench: the reference log-probs plus one epoch of DPO on bench.py's fixed workload, timed (the SFT
    warm start is not included)."""
    args = dataclasses.replace(args, epochs=1)
    pairs, model_path = bench.workload(args)
    device, autocast = common.device_and_autocast()
    tok = common.load_tokenizer(model_path)
    model = common.load_model(model_path, AutoModelForCausalLM, tok, device, args.grad_ckpt, args.pack)
    encoded = common.encode_pairs(tok, pairs, args.max_len)
    loss = dpo_batch_loss(model, tok.pad_token_id, args.beta, 0.0, args.pack)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "metrics.jsonl"
        if device.type == "cuda":  # kernels and the allocator warm up on one untimed step
            warm = [{"chosen": c, "rejected": r, "gt_agree": True, "ref_chosen": 0.0, "ref_rejected": 0.0}
                    for c, r in encoded[:args.batch_size]]
            train(model, warm, loss, units=one_per_pair, lr=args.lr, epochs=1, args=args, log_path=log_path,
                  autocast=autocast, desc="warm-up")
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model.eval()
        ref = common.pair_logps(model, encoded, tok.pad_token_id, args.micro_batch, autocast)
        examples = [{"chosen": c, "rejected": r, "gt_agree": True, "ref_chosen": ref_c.sum, "ref_rejected": ref_r.sum}
                    for (c, r), (ref_c, ref_r) in zip(encoded, ref)]
        steps = train(model, examples, loss, units=one_per_pair, lr=args.lr, epochs=1, args=args, log_path=log_path,
                      autocast=autocast, desc="bench dpo")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    real, computed = bench.padded_tokens(steps, [common.row_lengths(common.example_texts(e), args.pack)
                                                  for e in examples])
    return bench.report("dpo", model, seconds, len(examples), real, computed, " (reference log-probs included)")


# ----------------------------------------------------------------------------------------------------
# the experiment

def main(argv=None):
    args = common.parse_args(Args, argv)
    common.check_args(args)  # every option in range before anything loads
    if torch.cuda.is_available():  # cuDNN attention re-plans for every new sequence length: CPU-bound (README, Speed;
        torch.backends.cuda.enable_cudnn_sdp(False)  # https://github.com/pytorch/pytorch/pull/155958)
    if args.bench:
        return run_bench(args)

    # data splits, the locked run folder, the models (tiny ones built here), the code digest for stage caches
    run = common.start_run(args, "dpo", code_files=[common.__file__, __file__])
    gt, gt_targets = run.splits["gt"], [1.0] * len(run.splits["gt"])  # ground truth: chosen is better
    weak_len = args.weak_max_len or args.max_len
    stages = {}
    # 1. weak ceiling: the weak model on ground truth, reading weak_max_len tokens; it labels the w2s split
    stages["weak"] = common.cached(run, "weak", train_and_predict, role="weak", max_len=weak_len,
                                   pairs=gt, targets=gt_targets, label_split="w2s")
    # 2. strong ceiling: the strong model on ground truth
    stages["strong"] = common.cached(run, "strong", train_and_predict, role="strong", max_len=args.max_len,
                                     pairs=gt, targets=gt_targets)
    labeller = stages["weak"]
    if args.intermediate:  # bootstrapping: the intermediate model learns the weak labels, then labels the gt split
        pairs, targets = common.student_data(args, run.splits, labeller, with_helpful=False)
        labeller = stages["intermediate"] = common.cached(
            run, "intermediate", train_and_predict, role="intermediate", max_len=args.max_len,
            pairs=pairs, targets=targets, label_split="gt")
    # 3. students: the strong model, fresh, on the labeller's hard labels (its preferred response as chosen);
    #    implicit: plus ground-truth helpfulness pairs; explicit: plus alpha * the conflict term, the only
    #    place a student sees ground truth
    for setting in args.settings.split(","):
        pairs, targets = common.student_data(args, run.splits, labeller, with_helpful=setting == "implicit")
        alpha = args.alpha if setting == "explicit" else 0.0
        stages[f"student-{setting}"] = common.cached(
            run, f"student-{setting}", train_and_predict, role="strong", max_len=args.max_len,
            pairs=pairs, targets=targets, alpha=alpha, ceilings=stages)
    # 4. report: accuracies (and implicit-reward accuracies), PGR, the knowledge-space table and the DS
    return common.report(run, stages, "DPO", extra_metrics=("implicit_accuracy",))


if __name__ == "__main__":
    main()
