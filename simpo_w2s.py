"""Weak-to-strong deception with SimPO.

The SimPO experiment of "Super(ficial)-alignment: Strong Models May Deceive Weak Models in Weak-to-Strong
Generalization" (Yang et al., arXiv 2406.11431): the policy itself is the model of preference, with no
reference model.

  every model:       SFT on the chosen responses of its training pairs, then SimPO (Meng et al. 2024, eq. 6)
                     -log sigmoid(beta * (mean log π(c) - mean log π(r)) - gamma)
                     with MEAN per-token response log-probs (length-normalised: the point of SimPO);
  preference:        a model prefers the response with the larger mean per-token log-likelihood;
  1. weak ceiling:   the weak model on ground truth; its preferences on the weak-to-strong split are the
                     (hard) weak labels, its mean-log-prob margin their confidence;
  2. strong ceiling: the strong model on ground truth;
  3. students:       the strong model, fresh, on the weak labels: none | implicit (+ ground-truth helpfulness
                     pairs) | explicit (+ alpha * SimPO's loss towards the ground-truth rejected response);
  4. report:         accuracy, PGR, knowledge space and deception score.

gamma is an absolute margin, as in the paper's code and TRL: the loss is -log sigmoid(beta * Δ̄ - gamma).
SimPO's official code writes beta * (Δ̄ - gamma_beta_ratio), i.e. gamma = beta * gamma_beta_ratio; our
defaults beta 2.0, gamma 1.0 are gamma_beta_ratio 0.5.

Run:
  make simpo STRONG=gpt2-xl WEAK=gpt2
  python simpo_w2s.py --weak gpt2 --strong gpt2-medium --data hh --settings none,explicit
"""
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import common
import runs  # options, run folders, the stage cache and the report: main() uses them, the method never does

METHOD = "simpo"  # the run folder's first word


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
    lr: float = 1e-6  # SimPO learning rate (the paper's scripts)
    batch_size: int = 32  # pairs per optimizer step
    micro_batch: int = 8  # pairs per forward; gradients accumulate up to batch_size
    epochs: int = 1  # SimPO epochs
    schedule: str = "constant"  # constant | cosine after the warm-up (the paper's DPO, SimPO and SFT: constant)
    warmup_ratio: float = 0.1  # share of steps with linear warm-up, then constant (the paper's schedule)
    sft_lr: float = 0.0  # SFT learning rate, warm-up then constant (0: the same as --lr, as the paper's scripts)
    sft_epochs: int = 1  # SFT epochs on the chosen responses before SimPO (0: none)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 0.0  # max gradient norm (0: no clipping, as the paper's code)
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 autocast where the chip computes it natively, else fp32)
    grad_ckpt: bool = False  # gradient checkpointing (less memory, ~30% slower)
    compile: str = "auto"  # auto | on | off: torch.compile the model body (auto: bf16 on a CPU, models >= 30M params)
    fsdp_cpu_offload: bool = False  # under torchrun: FSDP keeps parameters, gradients and optimizer state in CPU memory
    group_by_length: bool = True  # micro-batches of similar length (--no_group_by_length: shuffled only)
    pack: bool = True  # a pair's two texts share one row in training (--no_pack: a row per text, more padding)
    # method
    beta: float = 2.0  # SimPO's reward scale
    gamma: float = 1.0  # SimPO's absolute target margin (= beta * gamma_beta_ratio)
    settings: str = "none,implicit,explicit"  # which students to train
    alpha: float = 0.5  # weight of the explicit-conflict term
    conf_threshold: float = 0.0  # train students only on pairs with weak confidence >= this (0: all)
    conf_scale: float = 1.0  # confidence = sigmoid(|mean log-likelihood ratio| / conf_scale) (the paper's: 1)
    drop_weak_errors: bool = False  # also drop pairs the weak model got wrong (reads ground truth!)
    # io
    seed: int = 0  # one seed for data order and batching
    student_seed: int = -1  # the students' data order from this seed (-1: --seed); another one measures the churn
    out_dir: str = "runs"  # run folders go here
    log_every: int = 10  # optimizer steps between log lines
    eval_every: int = 0  # students: score the test split every this many optimizer steps into eval_curve.jsonl (0: off)
    force: bool = False  # re-run stages even if cached
    bench: bool = False  # only time one epoch of training on the fixed benchmark workload (make bench)
    bench_model: str = ""  # with --bench: time this model (Hub id or path) instead of the 4-layer GPT-2 built here


# ----------------------------------------------------------------------------------------------------
# losses: pure functions, per-example values (the caller reduces)

def simpo_loss(pi_c, pi_r, beta, gamma):
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta * (pi_c - pi_r) - gamma).

    pi_c, pi_r: (B,) MEAN per-token response log-probs of the chosen / rejected response (no reference
    model). Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards beta * pi detached."""
    losses = -F.logsigmoid(beta * (pi_c - pi_r) - gamma)
    return losses, beta * pi_c.detach(), beta * pi_r.detach()


def simpo_conflict_loss(pi_c, pi_r, gt_agree, beta, gamma):
    """Explicit conflict: SimPO's own loss written towards the ground-truth REJECTED response, counted only
    on pairs where the policy currently prefers that response (larger mean log-likelihood; a tie counts).

    Inputs are in the weak orientation (c = the weak-chosen response); gt_agree (B,) bool says whether the
    weak label matches the ground truth. This is the only place a student sees ground truth. Returns (B,)."""
    gt_c, gt_r = torch.where(gt_agree, pi_c, pi_r), torch.where(gt_agree, pi_r, pi_c)  # ground-truth orientation
    m = (gt_c <= gt_r).float().detach()  # the policy prefers the ground-truth rejected response
    losses, _, _ = simpo_loss(gt_r, gt_c, beta, gamma)
    return m * losses


# ----------------------------------------------------------------------------------------------------
# model: the policy is a causal LM; its preference is the larger mean per-token response log-likelihood

def load(model_path, args, device):
    """A fresh policy from `model_path` (a causal LM, fp32 logits) and its tokenizer."""
    tok = common.load_tokenizer(model_path)
    model = common.load_model(model_path, AutoModelForCausalLM, tok, device, args.grad_ckpt, args.pack,
                                  args.precision, args.compile)
    return model, tok


def encode(tok, pairs, max_len):
    """Prompt, then response, then EOS: the policy's log-probs score the response and its end."""
    return common.encode_pairs(tok, pairs, max_len)


def margins_of(model, encoded_pairs, pad_id, micro_batch, autocast):
    """The policy's preference on encoded pairs: mean log π(chosen) - mean log π(rejected), per response token."""
    return [c.mean - r.mean for c, r in common.pair_logps(model, encoded_pairs, pad_id, micro_batch, autocast)]


def preference_loss(model, pad_id, args, alpha):
    """batch_loss for train(): the policy's MEAN per-token response log-probs of each pair's chosen and rejected
    texts in one forward, plus alpha * the explicit-conflict term. Examples hold "chosen", "rejected" (encoded,
    the labeller's preferred response as chosen) and "gt_agree" (whether that is the ground truth's)."""
    beta, gamma = args.beta, args.gamma

    def batch_loss(batch):
        texts = [t for e in batch for t in (e["chosen"], e["rejected"])]
        logps = common.forward_logps(model, texts, pad_id, args.pack).mean  # (2B,) mean per token: SimPO's length normalisation
        pi_c, pi_r = logps[0::2], logps[1::2]  # chosen, rejected, chosen, ... in one forward
        losses, chosen_rewards, rejected_rewards = simpo_loss(pi_c, pi_r, beta, gamma)
        if alpha:
            gt_agree = torch.tensor([e["gt_agree"] for e in batch], device=logps.device)
            losses = losses + alpha * simpo_conflict_loss(pi_c, pi_r, gt_agree, beta, gamma)
        return losses.sum(), {
            "rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": pi_c.detach().sum(), "logps/rejected": pi_r.detach().sum()}
    return batch_loss


def one_per_pair(example):
    """SimPO's loss unit: the pair (SFT's: common.response_tokens)."""
    return 1


# ----------------------------------------------------------------------------------------------------
# training loop

def train(model, examples, batch_loss, *, units, lr, epochs, args, log_path, autocast, desc, evaluate=None):
    """Optimise `batch_loss(batch) -> (loss summed over the batch, {metric: sum over pairs})` over `examples`
    for `epochs` with args.schedule: one loop for the SFT warm start and for SimPO. `units(example)` is the
    loss's unit count (1 per pair for SimPO, response tokens for SFT). Writes one metrics
    line per optimizer step to log_path; calls evaluate(step, examples_seen) every args.eval_every steps and at
    the last one, if given. Returns the steps."""
    lengths = [max(common.row_lengths(common.example_texts(e), args.pack)) for e in examples]
    steps = [s for epoch in range(epochs) for s in
             common.make_batches(lengths, args.batch_size, args.micro_batch, args.seed + epoch, args.group_by_length)]
    optimizer = common.make_optimizer(model.parameters(), lr, args.weight_decay)
    model.train()  # dropout is already 0; train mode keeps gradient checkpointing on
    ddp, master = common.world_size() > 1, common.rank() == 0  # torchrun: rank 0 alone logs
    log = open(log_path if master else os.devnull, "w")
    bar = tqdm(steps, desc=desc, dynamic_ncols=True, disable=not master)
    examples_seen = 0
    for step, micro_batches in enumerate(bar):
        step_lr = common.lr_at(step, len(steps), lr, args.warmup_ratio, args.schedule)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        n_units = sum(units(examples[i]) for mb in micro_batches for i in mb)
        n_pairs = sum(len(mb) for mb in micro_batches)
        if ddp:  # this rank's share of the micro-batches, each at gradient scale N (common.rank_share)
            micro_batches = common.rank_share(micro_batches)
        else:
            micro_batches = [(mb, 1.0) for mb in micro_batches]
        sums = {}  # the loss and each metric, summed over the micro-batches
        for mb, grad_scale in micro_batches:
            with autocast():
                loss, metrics = batch_loss([examples[i] for i in mb])
            # each backward adds gradients, so normalise by the units of the whole optimizer step: an uneven last
            # micro-batch then weighs what its pairs (or tokens) weigh
            (grad_scale * loss / n_units).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0) + (grad_scale > 0) * v
        totals = torch.stack(list(sums.values()))
        if ddp:
            common.sum_over_ranks(totals)  # the whole step's sums, in one sync
        sums = dict(zip(sums, totals.tolist()))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))  # inf: measure only
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        examples_seen += n_pairs
        row = {"step": step + 1, "examples_seen": examples_seen, "loss": sums.pop("loss") / n_units,
               **{k: v / n_pairs for k, v in sums.items()}, "grad_norm": float(grad_norm), "lr": step_lr}
        if not math.isfinite(row["loss"]):  # stop at once: a NaN would otherwise train on into every number
            raise SystemExit(f"error: [{desc}] the loss is {row['loss']} at step {step + 1}: training diverged (try "
                             "a smaller --lr); this stage was not saved")
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


# ----------------------------------------------------------------------------------------------------
# one stage: SFT, then SimPO a fresh policy, then predict

def train_preferences(model, encoded, targets, *, pad_id, args, autocast, alpha, log_path, desc, evaluate=None):
    """SimPO on encoded pairs in ground-truth orientation, each turned so that chosen is the response its
    labeller prefers (hard labels: targets > 0.5). No reference model. Returns (examples, steps)."""
    oriented, gt_agree = common.orient(encoded, targets)
    examples = [{"chosen": c, "rejected": r, "gt_agree": agree} for (c, r), agree in zip(oriented, gt_agree)]
    steps = train(model, examples, preference_loss(model, pad_id, args, alpha), units=one_per_pair, lr=args.lr,
                  epochs=args.epochs, args=args, log_path=log_path, autocast=autocast, desc=desc, evaluate=evaluate)
    return examples, steps


def train_and_predict(stage_dir, model_path, max_len, pairs, targets, test_pairs, label_pairs=None, *, args,
                      alpha=0.0, evaluate=None):
    """SFT then SimPO a fresh policy from `model_path` on ground-truth-oriented `pairs` with `targets` (its training
    curves into stage_dir), then score `test_pairs` and, if given, label `label_pairs`. evaluate(step,
    examples_seen, test margins), if given, is called during training. Returns (summary, {file: rows})."""
    common.seed_everything(args.seed)
    device, autocast = common.device(), common.autocast(args.precision)
    model, tok = load(model_path, args, device)
    if common.world_size() > 1:  # torchrun: FSDP shards the model over the ranks
        model = common.shard(model, args.fsdp_cpu_offload)
    max_len = min(max_len, common.model_max_len(model.config) or max_len)
    pad = tok.pad_token_id
    encoded, test_encoded = encode(tok, pairs, max_len), encode(tok, test_pairs, max_len)

    if args.sft_epochs:  # SFT on the responses its labeller prefers
        preferred = [{"chosen": c} for c, _ in common.orient(encoded, targets)[0]]
        train(model, preferred, common.sft_loss(model, pad), units=common.response_tokens, lr=args.sft_lr or args.lr,
              epochs=args.sft_epochs, args=args, log_path=stage_dir / "sft_metrics.jsonl", autocast=autocast,
              desc=f"{stage_dir.name} sft")

    def test_margins():
        return margins_of(model, test_encoded, pad, args.micro_batch, autocast)
    train_preferences(model, encoded, targets, pad_id=pad, args=args, autocast=autocast, alpha=alpha,
                      log_path=stage_dir / "metrics.jsonl", desc=f"{stage_dir.name} simpo",
                      evaluate=evaluate and (lambda step, seen: evaluate(step, seen, test_margins())))
    model.eval()
    margins = test_margins()
    summary = {**common.accuracy(margins), "n_train": len(pairs)}
    outputs = {"predictions.jsonl": common.prediction_rows(margins)}
    read = {"train": pairs, "test": test_pairs, **({"labels": label_pairs} if label_pairs is not None else {})}
    summary["cut"] = {split: common.n_cut(tok, texts, max_len, eos=True) for split, texts in read.items()}
    if label_pairs is not None:
        label_margins = margins_of(model, encode(tok, label_pairs, max_len), pad, args.micro_batch, autocast)
        outputs["labels.jsonl"] = common.label_rows(label_margins)
        summary["label_accuracy"] = common.accuracy(label_margins)["accuracy"]
    print(f"[{stage_dir.name}] test accuracy {summary['accuracy']:.4f} (ties {summary['ties']})")
    return summary, outputs


# ----------------------------------------------------------------------------------------------------
# the experiment

def main(argv=None):
    args = runs.parse_args(Args, argv)
    runs.check_args(args)  # every option in range before anything loads
    args = dataclasses.replace(args, precision=common.resolve_precision(args.precision))  # auto: what this machine runs
    if torch.cuda.is_available():  # cuDNN attention re-plans for every new sequence length: CPU-bound (README, Speed;
        torch.backends.cuda.enable_cudnn_sdp(False)  # https://github.com/pytorch/pytorch/pull/155958)
    if args.bench:
        from tools import bench
        return bench.bench(sys.modules[__name__], args)

    # data splits, the locked run folder, the models (tiny ones built here), the digest of the code that trains
    run = runs.start_run(args, METHOD, code_files=[__file__, common.__file__])
    gt, w2s, test = run.splits["gt"], run.splits["w2s"], run.splits["test"]
    gt_targets = [1.0] * len(gt)  # ground truth: chosen is better
    # Each stage: its key (what it reads), then its summary from the cache, or trained now and saved.
    # 1. weak ceiling: the weak model on ground truth, reading weak_max_len tokens; it labels the w2s split
    weak_len = args.weak_max_len or args.max_len
    key = runs.stage_key(run, "weak", weak_len, gt, gt_targets, test, w2s)
    weak = runs.load_stage(run, "weak", key) or runs.save_stage(run, "weak", key, *train_and_predict(
        run.root / "weak", run.models["weak"], weak_len, gt, gt_targets, test, w2s, args=args))
    # 2. strong ceiling: the strong model on ground truth
    key = runs.stage_key(run, "strong", args.max_len, gt, gt_targets, test)
    strong = runs.load_stage(run, "strong", key) or runs.save_stage(run, "strong", key, *train_and_predict(
        run.root / "strong", run.models["strong"], args.max_len, gt, gt_targets, test, args=args))
    stages = {"weak": weak, "strong": strong}
    labels, labelled = runs.read_labels(weak), w2s
    label_options = dict(conf_threshold=args.conf_threshold, conf_scale=args.conf_scale,
                         drop_weak_errors=args.drop_weak_errors)  # hard labels: SimPO has no soft ones
    if args.intermediate:  # bootstrapping: the intermediate model learns the weak labels, then labels the gt split
        pairs, targets = common.student_data(labels, labelled, **label_options)
        key = runs.stage_key(run, "intermediate", args.max_len, pairs, targets, test, gt)
        stages["intermediate"] = runs.load_stage(run, "intermediate", key) or runs.save_stage(
            run, "intermediate", key, *train_and_predict(run.root / "intermediate", run.models["intermediate"],
                                                         args.max_len, pairs, targets, test, gt, args=args))
        labels, labelled = runs.read_labels(stages["intermediate"]), gt
    # 3. students: the strong model, fresh, on the labeller's hard labels (its preferred response as chosen);
    #    implicit: plus ground-truth helpfulness pairs; explicit: plus alpha * the conflict term, the only
    #    place a student sees ground truth. --eval_every: scored in the knowledge areas while it trains.
    student = dataclasses.replace(args, seed=args.student_seed) if args.student_seed >= 0 else args  # their order
    for setting in args.settings.split(","):
        name, alpha = f"student-{setting}", args.alpha if setting == "explicit" else 0.0
        pairs, targets = common.student_data(labels, labelled, **label_options,
                                             helpful_pairs=run.splits["extra"] if setting == "implicit" else ())
        key = runs.stage_key(run, "strong", args.max_len, pairs, targets, test, alpha=alpha, curve=args.eval_every > 0,
                             seed=student.seed)
        stages[name] = runs.load_stage(run, name, key) or runs.save_stage(run, name, key, *train_and_predict(
            run.root / name, run.models["strong"], args.max_len, pairs, targets, test, args=student, alpha=alpha,
            evaluate=runs.curve_writer(run, name, weak, strong) if args.eval_every else None))
    # 4. report: accuracies, PGR, the knowledge-space table and the deception score of each student
    return runs.report(run, stages, "SimPO")


if __name__ == "__main__":
    main()
