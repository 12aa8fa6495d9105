"""Weak-to-strong deception with reward models.

Reproduces the reward-modeling experiment of "Super(ficial)-alignment: Strong Models May Deceive Weak
Models in Weak-to-Strong Generalization" (Yang et al., arXiv 2406.11431):

  1. weak ceiling:   the weak model + a scalar head, trained on ground truth with the Bradley-Terry loss
                     -log sigmoid(r(chosen) - r(rejected)); it then labels the weak-to-strong split with
                     p = sigmoid(r_w(chosen) - r_w(rejected)) (soft, as the paper's code; --hard_labels: 0/1);
  2. strong ceiling: the strong model, trained the same way;
  3. students:       the strong model, fresh from its pretrained weights, trained on the weak labels with
                     BCE(sigmoid(r_c - r_r), p):  none | implicit (+ ground-truth helpfulness pairs) |
                     explicit (+ alpha * a reward for contradicting the ground truth);
  4. report:         accuracy, PGR, the knowledge-space table and the deception score (common.py).

Run:
  make rm STRONG=gpt2-xl WEAK=gpt2
  python rm_w2s.py --weak gpt2 --strong gpt2-medium --data hh --settings none,explicit
  python rm_w2s.py --data toy --weak tiny:1x32 --strong tiny:2x64 ...   (offline: make demo, docs/toy.md)
"""
import dataclasses
import json
import math
import os
import random
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModel

import common
import runs  # options, run folders, the stage cache and the report: main() uses them, the method never does

METHOD = "rm"  # the run folder's first word


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
    max_len: int = 512  # tokens per text (capped by the model's maximum positions)
    weak_max_len: int = 0  # a shorter reading window for the weak model alone (0: max_len)
    # optimization
    lr: float = 1e-5  # peak learning rate (the paper's)
    head_lr: float = 0.0  # the reward head's own peak rate, on the same schedule (0: --lr, as the paper's code)
    batch_size: int = 32  # pairs per optimizer step
    micro_batch: int = 8  # pairs per forward; gradients accumulate up to batch_size
    epochs: int = 1  # passes over the training pairs
    schedule: str = "cosine"  # cosine | constant after the warm-up (the paper's reward models: cosine decay)
    warmup_ratio: float = 0.0  # share of steps with linear warm-up before the schedule (the paper's: none)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 0.0  # max gradient norm (0: no clipping, as the paper's code)
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 autocast where the chip computes it natively, else fp32)
    grad_ckpt: bool = False  # gradient checkpointing (less memory, ~30% slower)
    compile: str = "auto"  # auto | on | off: torch.compile the model body (auto: bf16 on a CPU, models >= 30M params)
    fsdp_cpu_offload: bool = False  # under torchrun: FSDP keeps parameters, gradients and optimizer state in CPU memory
    group_by_length: bool = True  # micro-batches of similar length (--no_group_by_length: shuffled only)
    pack: bool = True  # a pair's two texts share one row in training (--no_pack: a row per text, more padding)
    # method
    settings: str = "none,implicit,explicit"  # which students to train
    alpha: float = 0.5  # weight of the explicit-conflict term
    hard_labels: bool = False  # 0/1 weak labels instead of soft probabilities
    conf_threshold: float = 0.0  # train students only on pairs with weak confidence >= this (0: all)
    conf_scale: float = 1.0  # confidence = sigmoid(|reward margin| / conf_scale) (the paper's: 1)
    drop_weak_errors: bool = False  # also drop pairs the weak model got wrong (reads ground truth!)
    # io
    seed: int = 0  # one seed for data order, head init and batching
    student_seed: int = -1  # the students' data order from this seed (-1: --seed); another one measures the churn
    out_dir: str = "runs"  # run folders go here
    log_every: int = 10  # optimizer steps between log lines
    eval_every: int = 0  # students: score the test split every this many optimizer steps into eval_curve.jsonl (0: off)
    force: bool = False  # re-run stages even if cached
    bench: bool = False  # only time one epoch of training on the fixed benchmark workload (make bench)
    bench_model: str = ""  # with --bench: time this model (Hub id or path) instead of the 4-layer GPT-2 built here


# ----------------------------------------------------------------------------------------------------
# losses: pure functions, per-example values (the caller reduces)

def soft_label_loss(r_c, r_r, p):
    """BCE(sigmoid(r_c - r_r), p), the weak-to-strong loss of the paper's code.

    r_c, r_r: (B,) rewards of the chosen / rejected texts; p: (B,) probability that chosen is better.
    With p = 1 it is the Bradley-Terry loss -log sigmoid(r_c - r_r) used for the ceilings.
    Returns (B,) losses."""
    return F.binary_cross_entropy_with_logits(r_c - r_r, p, reduction="none")


def explicit_conflict_loss(r_c, r_r, y_gt, tie_means_chosen):
    """The extra reward the conflicting objective pays for contradicting the ground truth:
    BCE(sigmoid(Δ)·m, (1 - y_gt)·m) with m = 1[the student's current prediction contradicts y_gt].
    Since BCE(0, 0) = 0 this is m · BCE(sigmoid(Δ), 1 - y_gt): zero where the student agrees with the
    ground truth, and where it does not, a push of the margin further the wrong way. m is a detached mask.
    This is the only place a student sees ground truth. A tie predicts the text the pair shows first, as in
    the paper's code (`logits >= 0`, pairs shown in random orientation): with the zero head every first margin
    is a tie, and the term then fires on about half the pairs, not on all of them.

    r_c, r_r: (B,) rewards; y_gt: (B,) 1.0 if `chosen` is the ground-truth chosen text; tie_means_chosen: (B,)
    bool, whether the pair shows `chosen` first. Returns (B,)."""
    margin = r_c - r_r
    predicts_chosen = (margin > 0) | ((margin == 0) & tie_means_chosen)
    m = (predicts_chosen.float() != y_gt).float()
    return m * F.binary_cross_entropy_with_logits(margin, 1 - y_gt, reduction="none")


# ----------------------------------------------------------------------------------------------------
# model: any causal LM body + a scalar head on the last real token

class RewardModel(nn.Module):
    """The body's last hidden state at the text's last token -> a scalar reward. The head starts at zero and
    has no bias, as in the paper's code: every margin starts at 0, so the first weak labels are 0.5 and no
    random head decides the ceilings' first steps."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        width = getattr(body.config, "word_embed_proj_dim", None) or body.config.hidden_size  # OPT-350m projects
        self.head = nn.Linear(width, 1, bias=False)
        nn.init.zeros_(self.head.weight)
        self.head.to(body.device)

    def forward(self, inputs, rows, last):
        """inputs: common.collate's model arguments for R rows; rows, last (N,): the row and position of each
        text's last token, from the texts' lengths, never from token values (GPT-2's pad id 0 is "!").
        Returns (N,) rewards read there, computed in fp32 even under bf16 autocast: a bf16 reward moves in
        steps of 1/64 to 1/32 at |r| of 2 to 8, which makes ties and flips margins."""
        hidden = self.body(**inputs).last_hidden_state  # (R, T, H)
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(hidden[rows, last].float()).sum(-1)  # (N,): its one column (sum: a new tensor, not a view)


def load(model_path, args, device):
    """A fresh reward model from `model_path` (its pretrained body, a zero head) and its tokenizer."""
    tok = common.load_tokenizer(model_path)
    body = common.load_model(model_path, AutoModel, tok, device, args.grad_ckpt, args.pack, args.precision,
                             args.compile)
    return RewardModel(body), tok


def encode(tok, pairs, max_len):
    """The reward is read at the text's last token, the response's own last token as in the paper's code (no
    EOS appended): there attention can compare the answer with the request directly."""
    return common.encode_pairs(tok, pairs, max_len, eos=False, keep_response_end=True)


@torch.no_grad()
def score_pairs(model, encoded_pairs, pad_id, micro_batch, autocast):
    """Margins r(chosen) - r(rejected) of encoded pairs, in their order. Texts are scored alone, batched by
    length, so evaluation pads little."""
    def score(batch):
        with autocast():
            return model(batch.inputs, batch.rows, batch.last).tolist()
    rewards = common.score_by_length(encoded_pairs, pad_id, micro_batch, common.device(), score)
    return [chosen - rejected for chosen, rejected in rewards]


def preference_loss(model, batch, pad_id, args, alpha):
    """The soft-label loss on the rewards of each pair's chosen and rejected texts, in one forward, plus alpha *
    the explicit-conflict term. `batch`: examples holding "chosen", "rejected" (encoded texts in ground-truth
    orientation), "target" (P(chosen is better) by the labeller) and "chosen_first" (which text a tie predicts).
    Returns (the loss summed over the pairs, {metric: its sum over the pairs})."""
    device = common.device()
    texts = [t for e in batch for t in (e["chosen"], e["rejected"])]
    inputs, _, rows, last = common.collate(texts, pad_id, device, args.pack)
    rewards = model(inputs, rows, last)  # (2B,): chosen, rejected, chosen, ... in one forward
    r_c, r_r = rewards[0::2], rewards[1::2]  # (B,), (B,)
    p = torch.tensor([e["target"] for e in batch], device=device)  # (B,)
    losses = soft_label_loss(r_c, r_r, p)
    if alpha:
        y_gt = torch.ones_like(p)  # the pairs are in ground-truth orientation: chosen is the ground-truth chosen
        shown_first = torch.tensor([e["chosen_first"] for e in batch], device=device)  # (B,) bool
        losses = losses + alpha * explicit_conflict_loss(r_c, r_r, y_gt, shown_first)
    r_c, r_r = r_c.detach(), r_r.detach()
    return losses.sum(), {
        "rewards/accuracies": ((r_c > r_r).float() == (p > 0.5).float()).float().sum(),  # agreement with p
        "rewards/chosen": r_c.sum(), "rewards/rejected": r_r.sum(), "rewards/margins": (r_c - r_r).sum()}


# ----------------------------------------------------------------------------------------------------
# training loop

def train(model, examples, *, pad_id, alpha, args, log_dir, curve=None):
    """Optimise preference_loss over `examples` (alpha: the explicit term's weight) for args.epochs at args.lr with
    args.schedule. One metrics line per optimizer step goes to log_dir/metrics.jsonl. curve (--eval_every, a
    student): common.EvalCurve, whose test pairs are scored every args.eval_every steps and at the last one into
    log_dir/eval_curve.jsonl. Returns the steps."""
    desc, autocast = log_dir.name, common.autocast(args.precision)
    lengths = [max(common.row_lengths(common.example_texts(e), args.pack)) for e in examples]
    steps = [s for epoch in range(args.epochs) for s in
             common.make_batches(lengths, args.batch_size, args.micro_batch, args.seed + epoch, args.group_by_length)]
    # the body and the zero-initialised head in two groups, so that --head_lr can give the head its own rate: at one
    # rate the pretrained body moves both rewards of a pair alike long before the head has found the direction
    # that tells them apart (docs/arith.md, the reward model)
    head = {id(p) for p in model.head.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in head], "scale": 1.0},
              {"params": list(model.head.parameters()), "scale": (args.head_lr or args.lr) / args.lr}]
    optimizer = common.make_optimizer(groups, args.lr, args.weight_decay)
    model.train()  # dropout is already 0; train mode keeps gradient checkpointing on
    ddp, master = common.world_size() > 1, common.rank() == 0  # torchrun: rank 0 alone logs
    log = open(log_dir / "metrics.jsonl" if master else os.devnull, "w")
    bar = tqdm(steps, desc=desc, dynamic_ncols=True, disable=not master)
    examples_seen = 0
    for step, micro_batches in enumerate(bar):
        lr = common.lr_at(step, len(steps), args.lr, args.warmup_ratio, args.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        n_pairs = sum(len(mb) for mb in micro_batches)
        if ddp:  # this rank's share of the micro-batches, each at gradient scale N (common.rank_share)
            micro_batches = common.rank_share(micro_batches)
        else:
            micro_batches = [(mb, 1.0) for mb in micro_batches]
        sums = {}  # the loss and each metric, summed over the micro-batches
        for mb, grad_scale in micro_batches:
            with autocast():
                loss, metrics = preference_loss(model, [examples[i] for i in mb], pad_id, args, alpha)
            # each backward adds gradients, so normalise by the pairs of the whole optimizer step: an uneven last
            # micro-batch then weighs what its pairs weigh
            (grad_scale * loss / n_pairs).backward()
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
        row = {"step": step + 1, "examples_seen": examples_seen, "loss": sums.pop("loss") / n_pairs,
               **{k: v / n_pairs for k, v in sums.items()}, "grad_norm": float(grad_norm), "lr": lr}
        if not math.isfinite(row["loss"]):  # stop at once: a NaN would otherwise train on into every number
            raise SystemExit(f"error: [{desc}] the loss is {row['loss']} at step {step + 1}: training diverged (try "
                             "a smaller --lr); this stage was not saved")
        log.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.3f}")
        if (step + 1) % args.log_every == 0 or step + 1 == len(steps):
            log.flush()
            tqdm.write(f"{desc} step {step + 1}/{len(steps)} " + " ".join(
                f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "examples_seen")))
        if curve and ((step + 1) % args.eval_every == 0 or step + 1 == len(steps)):
            margins = score_pairs(model, curve.pairs, pad_id, args.micro_batch, autocast)  # no_grad: training unchanged
            if master:
                common.append_jsonl(log_dir / "eval_curve.jsonl", common.curve_row(step + 1, examples_seen, margins,
                                                                                   curve.weak_correct,
                                                                                   curve.strong_correct))
    log.close()
    return steps


# ----------------------------------------------------------------------------------------------------
# one stage: train a fresh reward model, then predict

def train_preferences(model, encoded, targets, *, pad_id, args, alpha, log_dir, curve=None):
    """Train `model` on encoded pairs in ground-truth orientation with `targets` (P(chosen is better) by the
    labeller). Soft targets keep pairs in ground-truth orientation without telling the student anything: the
    loss is symmetric under swapping chosen and rejected (Δ -> -Δ, p -> 1 - p). "chosen_first": the random
    orientation the paper's code shows each pair in, which only decides what a tie predicts in the explicit
    term (seeded, from its own generator). Returns (examples, steps)."""
    rng = random.Random(args.seed)
    examples = [{"chosen": c, "rejected": r, "target": p, "chosen_first": rng.random() < 0.5}
                for (c, r), p in zip(encoded, targets)]
    steps = train(model, examples, pad_id=pad_id, alpha=alpha, args=args, log_dir=log_dir, curve=curve)
    return examples, steps


def train_and_predict(stage_dir, model_path, max_len, pairs, targets, test_pairs, label_pairs=None, *, args,
                      alpha=0.0, known=None):
    """Train a fresh reward model from `model_path` on ground-truth-oriented `pairs` with `targets` (its training
    curve into stage_dir), then score `test_pairs` and, if given, label `label_pairs`. known (--eval_every): the
    ceilings' (weak, strong) correctness per test pair, for the student's eval curve. Returns (summary, {file:
    rows})."""
    common.seed_everything(args.seed)
    device, autocast = common.device(), common.autocast(args.precision)
    model, tok = load(model_path, args, device)
    if common.world_size() > 1:  # torchrun: FSDP shards the model over the ranks
        model = common.shard(model, args.fsdp_cpu_offload)
    max_len = min(max_len, common.model_max_len(model.body.config) or max_len)
    pad = tok.pad_token_id
    test_encoded = encode(tok, test_pairs, max_len)
    curve = common.EvalCurve(test_encoded, *known) if known else None
    train_preferences(model, encode(tok, pairs, max_len), targets, pad_id=pad, args=args, alpha=alpha,
                      log_dir=stage_dir, curve=curve)
    model.eval()
    margins = score_pairs(model, test_encoded, pad, args.micro_batch, autocast)
    summary = {**common.accuracy(margins), "n_train": len(pairs)}
    outputs = {"predictions.jsonl": common.prediction_rows(margins)}
    read = {"train": pairs, "test": test_pairs, **({"labels": label_pairs} if label_pairs is not None else {})}
    summary["cut"] = {split: common.n_cut(tok, texts, max_len, eos=False) for split, texts in read.items()}
    if label_pairs is not None:
        label_margins = score_pairs(model, encode(tok, label_pairs, max_len), pad, args.micro_batch, autocast)
        outputs["labels.jsonl"] = common.label_rows(label_margins)
        summary["label_accuracy"] = common.accuracy(label_margins)["accuracy"]
    print(f"[{stage_dir.name}] test accuracy {summary['accuracy']:.4f} (ties {summary['ties']})")
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
    """A student's (pairs, targets): the labeller's soft labels p = sigmoid(margin) on `labelled` pairs (those it
    is confident on, with --conf_threshold), plus for the implicit conflict the ground-truth helpfulness pairs."""
    args = run.args
    return common.student_data(runs.read_labels(labeller), labelled, conf_threshold=args.conf_threshold,
                               conf_scale=args.conf_scale, hard_labels=args.hard_labels,
                               drop_weak_errors=args.drop_weak_errors,
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
    # 4. students: the strong model, fresh, on the labeller's soft labels; implicit: plus ground-truth helpfulness
    #    pairs; explicit: plus alpha * the conflict term, the only place a student sees ground truth
    for setting in args.settings.split(","):
        stages[f"student-{setting}"] = stage(run, f"student-{setting}", *student_data(run, labeller, labelled, setting),
                                             alpha=args.alpha if setting == "explicit" else 0.0)
    # 5. report: accuracies, PGR, the knowledge-space table and the deception score of each student
    return runs.report(run, stages, "Reward modeling")


if __name__ == "__main__":
    main()
