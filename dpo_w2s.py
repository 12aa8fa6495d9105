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

METHOD = "dpo"  # the run folder's first word


@dataclass
class Args:
    # data
    data: str = "hh"  # hh | cai | toy | arith | arith:val (its validation split as test) | a folder of harmless_*.jsonl
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
    schedule: str = "constant"  # constant | cosine after the warm-up (the paper's DPO, SimPO and SFT: constant)
    warmup_ratio: float = 0.1  # share of DPO steps with linear warm-up, then constant
    sft_lr: float = 0.0  # SFT learning rate, warm-up then constant (0: the same as --lr, as the paper's scripts)
    sft_epochs: int = 1  # SFT epochs on the chosen responses before DPO (0: none)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 0.0  # max gradient norm (0: no clipping, as the paper's code)
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 autocast where the chip computes it natively, else fp32)
    grad_ckpt: bool = False  # gradient checkpointing (less memory, ~30% slower)
    compile: str = "auto"  # auto | on | off: torch.compile the model body (auto: bf16 on a CPU, models >= 30M params)
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
    student_seed: int = -1  # the students' data order from this seed (-1: --seed); another one measures the churn
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
# model: the policy is a causal LM; its preference is the larger summed response log-likelihood

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
    """The policy's preference on encoded pairs: log π(chosen) - log π(rejected), summed response log-probs."""
    return [c.sum - r.sum for c, r in common.pair_logps(model, encoded_pairs, pad_id, micro_batch, autocast)]


def preference_loss(model, batch, pad_id, args, alpha):
    """DPO on the policy's summed response log-probs of each pair's chosen and rejected texts, in one forward,
    against the reference's, plus alpha * the explicit-conflict term. `batch`: examples holding "chosen",
    "rejected" (encoded, the labeller's preferred response as chosen), "gt_agree" (whether that is the ground
    truth's), "ref_chosen" and "ref_rejected" (the reference's summed log-probs). Returns (the loss summed over
    the pairs, {metric: its sum over the pairs})."""
    beta = args.beta
    texts = [t for e in batch for t in (e["chosen"], e["rejected"])]
    logps = common.forward_logps(model, texts, pad_id, args.pack).sum  # (2B,) summed: DPO's log π(y | x)
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


# ----------------------------------------------------------------------------------------------------
# training loop

def train(model, examples, *, sft=False, pad_id, alpha, args, log_dir, curve=None):
    """Optimise over `examples` with args.schedule: one loop for both objectives. sft: the SFT warm start, the
    chosen responses' NLL per token at args.sft_lr (0: args.lr) for args.sft_epochs, into log_dir/sft_metrics.jsonl;
    else DPO, preference_loss (alpha: the explicit term's weight) per pair at args.lr for args.epochs, into
    log_dir/metrics.jsonl (one line per optimizer step). curve (--eval_every, a student): common.EvalCurve, whose
    test pairs are scored every args.eval_every steps and at the last one into log_dir/eval_curve.jsonl. Returns the
    steps."""
    if sft:
        lr, epochs, desc, log_path = args.sft_lr or args.lr, args.sft_epochs, f"{log_dir.name} sft", "sft_metrics.jsonl"
    else:
        lr, epochs, desc, log_path = args.lr, args.epochs, f"{log_dir.name} dpo", "metrics.jsonl"
    autocast = common.autocast(args.precision)
    lengths = [max(common.row_lengths(common.example_texts(e), args.pack)) for e in examples]
    steps = [s for epoch in range(epochs) for s in
             common.make_batches(lengths, args.batch_size, args.micro_batch, args.seed + epoch, args.group_by_length)]
    optimizer = common.make_optimizer(model.parameters(), lr, args.weight_decay)
    model.train()  # dropout is already 0; train mode keeps gradient checkpointing on
    ddp, master = common.world_size() > 1, common.rank() == 0  # torchrun: rank 0 alone logs
    log = open(log_dir / log_path if master else os.devnull, "w")
    bar = tqdm(steps, desc=desc, dynamic_ncols=True, disable=not master)
    examples_seen = 0
    for step, micro_batches in enumerate(bar):
        step_lr = common.lr_at(step, len(steps), lr, args.warmup_ratio, args.schedule)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        n_pairs = sum(len(mb) for mb in micro_batches)
        # the loss's unit: a response token for SFT (a mean token NLL), a pair for DPO
        n_units = sum(common.response_tokens(examples[i]) for mb in micro_batches for i in mb) if sft else n_pairs
        if ddp:  # this rank's share of the micro-batches, each at gradient scale N (common.rank_share)
            micro_batches = common.rank_share(micro_batches)
        else:
            micro_batches = [(mb, 1.0) for mb in micro_batches]
        sums = {}  # the loss and each metric, summed over the micro-batches
        for mb, grad_scale in micro_batches:
            batch = [examples[i] for i in mb]
            with autocast():
                if sft:
                    loss, metrics = common.sft_loss(model, batch, pad_id)
                else:
                    loss, metrics = preference_loss(model, batch, pad_id, args, alpha)
            # each backward adds gradients, so normalise by the units of the whole optimizer step: an uneven last
            # micro-batch then weighs what its pairs (or tokens) weigh
            (grad_scale * loss / n_units).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                if grad_scale == 0:  # a rank's stand-in micro-batch (common.rank_share): it counts for nothing, but
                    v = torch.zeros_like(v)  # every rank must sum the same metrics
                sums[k] = sums.get(k, 0) + v
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
        if curve and ((step + 1) % args.eval_every == 0 or step + 1 == len(steps)):
            margins = margins_of(model, curve.pairs, pad_id, args.micro_batch, autocast)  # no_grad: training unchanged
            if master:
                common.append_jsonl(log_dir / "eval_curve.jsonl", common.curve_row(step + 1, examples_seen, margins,
                                                                                   curve.weak_correct,
                                                                                   curve.strong_correct))
    log.close()
    return steps


# ----------------------------------------------------------------------------------------------------
# one stage: SFT, then DPO a fresh policy, then predict

def train_preferences(model, encoded, targets, *, pad_id, args, alpha, log_dir, curve=None):
    """DPO on encoded pairs in ground-truth orientation, each turned so that chosen is the response its labeller
    prefers (hard labels: targets > 0.5). The reference is the model as it is now (the SFT model), frozen: its
    log-probs are computed once here, before DPO changes the weights, so no second model sits in memory while
    training, and its dropout can never be on. Returns (examples, steps)."""
    oriented, gt_agree = common.orient(encoded, targets)
    model.eval()
    ref = common.pair_logps(model, oriented, pad_id, args.micro_batch, common.autocast(args.precision))
    examples = [{"chosen": c, "rejected": r, "gt_agree": agree, "ref_chosen": ref_c.sum, "ref_rejected": ref_r.sum}
                for (c, r), (ref_c, ref_r), agree in zip(oriented, ref, gt_agree)]
    steps = train(model, examples, pad_id=pad_id, alpha=alpha, args=args, log_dir=log_dir, curve=curve)
    return examples, steps


def train_and_predict(stage_dir, model_path, max_len, pairs, targets, test_pairs, label_pairs=None, *, args,
                      alpha=0.0, known=None):
    """SFT then DPO a fresh policy from `model_path` on ground-truth-oriented `pairs` with `targets` (its training
    curves into stage_dir), then score `test_pairs` and, if given, label `label_pairs`. known (--eval_every): the
    ceilings' (weak, strong) correctness per test pair, for the student's eval curve. Returns (summary, {file:
    rows})."""
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
        train(model, preferred, sft=True, pad_id=pad, alpha=0.0, args=args, log_dir=stage_dir)
    model.eval()
    ref_test = common.pair_logps(model, test_encoded, pad, args.micro_batch, autocast)  # the reference, as below
    curve = common.EvalCurve(test_encoded, *known) if known else None
    train_preferences(model, encoded, targets, pad_id=pad, args=args, alpha=alpha, log_dir=stage_dir, curve=curve)
    model.eval()
    policy_test = common.pair_logps(model, test_encoded, pad, args.micro_batch, autocast)
    margins = [c.sum - r.sum for c, r in policy_test]
    implicit = [(c.sum - ref_c.sum) - (r.sum - ref_r.sum) for (c, r), (ref_c, ref_r) in zip(policy_test, ref_test)]
    rows = common.prediction_rows(margins)
    for row, m in zip(rows, implicit):
        row.update(implicit_margin=m, implicit_correct=m > 0)
    summary = {**common.accuracy(margins), "implicit_accuracy": common.accuracy(implicit)["accuracy"],
               "n_train": len(pairs)}
    outputs = {"predictions.jsonl": rows}
    read = {"train": pairs, "test": test_pairs, **({"labels": label_pairs} if label_pairs is not None else {})}
    summary["cut"] = {split: common.n_cut(tok, texts, max_len, eos=True) for split, texts in read.items()}
    if label_pairs is not None:
        label_margins = margins_of(model, encode(tok, label_pairs, max_len), pad, args.micro_batch, autocast)
        outputs["labels.jsonl"] = common.label_rows(label_margins)
        summary["label_accuracy"] = common.accuracy(label_margins)["accuracy"]
    print(f"[{stage_dir.name}] test accuracy {summary['accuracy']:.4f} (ties {summary['ties']}), "
          f"implicit-reward accuracy {summary['implicit_accuracy']:.4f}")
    return summary, outputs


def stage(run, name, pairs, targets, label_pairs=None, *, max_len=None, alpha=0.0):
    """The stage `name` (weak, strong, intermediate, student-SETTING) under a visible cache guard: the summary of
    a finished stage that read exactly this (runs.plan_stage: its key), or else its model trained on `pairs` with
    `targets` now, scored on the test split (labelling `label_pairs`, if given) and saved."""
    plan = runs.plan_stage(run, name, pairs, targets, label_pairs, max_len=max_len, alpha=alpha)
    return runs.load_stage(run, name, plan.key) or runs.save_stage(run, name, plan.key, *train_and_predict(
        run.root / name, run.models[plan.model], plan.max_len, pairs, targets, run.splits["test"], label_pairs,
        args=plan.args, alpha=alpha, known=plan.known))


def student_data(run, labeller, labelled, setting="none"):
    """A student's (pairs, targets): the labeller's hard labels on `labelled` pairs (DPO has no soft ones;
    with --conf_threshold only those it is confident on), plus for the implicit conflict the ground-truth
    helpfulness pairs."""
    args = run.args
    return common.student_data(runs.read_labels(labeller), labelled, conf_threshold=args.conf_threshold,
                               conf_scale=args.conf_scale, drop_weak_errors=args.drop_weak_errors,
                               helpful_pairs=run.splits["extra"] if setting == "implicit" else ())


# ----------------------------------------------------------------------------------------------------
# the experiment

def main(argv=None):
    args = runs.parse_args(Args, argv)
    runs.check_args(args)  # every option in range before anything loads
    args = dataclasses.replace(args, precision=common.resolve_precision(args.precision))  # auto: what this chip runs
    if args.bench:
        from tools import bench
        return bench.bench(sys.modules[__name__], args)
    # 1. data: the splits, the locked run folder, the models (tiny ones built here), the digest of the code
    run = runs.start_run(args, METHOD, code_files=[__file__, common.__file__])
    gt, w2s = run.splits["gt"], run.splits["w2s"]
    truth = [1.0] * len(gt)  # ground truth: chosen is better
    # 2. weak ceiling: the weak model on ground truth, reading weak_max_len tokens; it labels the w2s split
    weak = stage(run, "weak", gt, truth, w2s, max_len=args.weak_max_len)
    # 3. strong ceiling: the strong model on ground truth
    stages = {"weak": weak, "strong": stage(run, "strong", gt, truth)}
    labeller, labelled = weak, w2s
    if args.intermediate:  # bootstrapping: the intermediate model learns the weak labels, then labels the gt split
        labeller = stages["intermediate"] = stage(run, "intermediate", *student_data(run, weak, w2s), gt)
        labelled = gt
    # 4. students: the strong model, fresh, on the labeller's hard labels (its preferred response as chosen);
    #    implicit: plus ground-truth helpfulness pairs; explicit: plus alpha * the conflict term, the only
    #    place a student sees ground truth
    for setting in args.settings.split(","):
        stages[f"student-{setting}"] = stage(run, f"student-{setting}", *student_data(run, labeller, labelled, setting),
                                             alpha=args.alpha if setting == "explicit" else 0.0)
    # 5. report: accuracies (and implicit-reward accuracies), PGR, the knowledge-space table and the DS
    return runs.report(run, stages, "DPO", extra_metrics=("implicit_accuracy",))


if __name__ == "__main__":
    main()
