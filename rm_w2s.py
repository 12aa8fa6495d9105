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
  python rm_w2s.py --data toy --weak tiny:1x32 --strong tiny:2x64 ...   (offline, see README)
"""
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModel

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
    max_len: int = 512  # tokens per text (capped by the model's maximum positions)
    weak_max_len: int = 0  # a shorter reading window for the weak model alone (0: max_len)
    # optimization
    lr: float = 1e-5  # peak learning rate (the paper's)
    batch_size: int = 32  # pairs per optimizer step
    micro_batch: int = 8  # pairs per forward; gradients accumulate up to batch_size
    epochs: int = 1  # passes over the training pairs
    warmup_ratio: float = 0.0  # share of steps with linear warm-up before the cosine decay (the paper's: none)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 0.0  # max gradient norm (0: no clipping, as the paper's code)
    grad_ckpt: bool = False  # gradient checkpointing (less memory, ~30% slower)
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


def explicit_conflict_loss(r_c, r_r, y_gt):
    """The extra reward the conflicting objective pays for contradicting the ground truth:
    BCE(sigmoid(Δ)·m, (1 - y_gt)·m) with m = 1[the student's current prediction contradicts y_gt].
    Since BCE(0, 0) = 0 this is m · BCE(sigmoid(Δ), 1 - y_gt): zero where the student agrees with the
    ground truth, and where it does not, a push of the margin further the wrong way. m is a detached mask.
    This is the only place a student sees ground truth.

    r_c, r_r: (B,) rewards; y_gt: (B,) 1.0 if `chosen` is the ground-truth chosen text. Returns (B,)."""
    margin = r_c - r_r
    m = ((margin > 0).float() != y_gt).float()  # a tie predicts "rejected"
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


@torch.no_grad()
def score_pairs(model, encoded_pairs, pad_id, micro_batch, autocast):
    """Margins r(chosen) - r(rejected) of encoded pairs, in their order. Texts are scored alone, batched by
    length, so evaluation pads little."""
    def score(batch):
        with autocast():
            return model(batch.inputs, batch.rows, batch.last).tolist()
    rewards = common.score_by_length(encoded_pairs, pad_id, micro_batch, common.device_and_autocast()[0], score)
    return [chosen - rejected for chosen, rejected in rewards]


# ----------------------------------------------------------------------------------------------------
# training loop

def train(model, examples, *, pad_id, args, log_path, autocast, alpha, desc, evaluate=None):
    """examples: dicts with "chosen", "rejected" (encoded texts), "target" (P(chosen is better)) and "gt_agree"
    (whether chosen is the ground-truth chosen text: read only by the explicit-conflict term, when alpha > 0).
    Writes one metrics line per optimizer step to log_path; calls evaluate(step, examples_seen) every
    args.eval_every steps and at the last one, if given. Returns the steps."""
    device = common.device_and_autocast()[0]
    lengths = [max(common.row_lengths(common.example_texts(e), args.pack)) for e in examples]
    steps = [s for epoch in range(args.epochs) for s in
             common.make_batches(lengths, args.batch_size, args.micro_batch, args.seed + epoch, args.group_by_length)]
    optimizer = common.make_optimizer(model.parameters(), args.lr, args.weight_decay)
    model.train()  # dropout is already 0; train mode keeps gradient checkpointing on
    log = open(log_path if common.rank() == 0 else os.devnull, "w")  # torchrun: rank 0 writes
    bar = tqdm(steps, desc=desc, dynamic_ncols=True, disable=common.rank() != 0)
    examples_seen = 0
    for step, micro_batches in enumerate(bar):
        lr = common.lr_at(step, len(steps), args.lr, args.warmup_ratio, "cosine")
        for group in optimizer.param_groups:
            group["lr"] = lr
        n_pairs = sum(len(mb) for mb in micro_batches)
        sums = torch.zeros(5, device=device)  # loss, accuracy, chosen, rejected, margin (summed over pairs)
        for mb, weight in common.rank_share(micro_batches):  # one process: all of them, weight 1 (torchrun: common.py)
            batch = [examples[i] for i in mb]
            texts = [t for e in batch for t in (e["chosen"], e["rejected"])]
            inputs, _, rows, last = common.collate(texts, pad_id, device, args.pack)
            p = torch.tensor([e["target"] for e in batch], device=device)
            with autocast():
                rewards = model(inputs, rows, last)  # (2B,): chosen, rejected, chosen, ... in one forward
            r_c, r_r = rewards[0::2], rewards[1::2]  # (B,), (B,)
            losses = soft_label_loss(r_c, r_r, p)
            if alpha:
                y_gt = torch.tensor([float(e["gt_agree"]) for e in batch], device=device)
                losses = losses + alpha * explicit_conflict_loss(r_c, r_r, y_gt)
            # each backward adds gradients, so normalise by the pairs of the whole optimizer step: an uneven last
            # micro-batch then weighs what its pairs weigh
            (weight * losses.sum() / n_pairs).backward()
            with torch.no_grad():
                sums += (weight > 0) * torch.stack([losses.sum(), ((r_c > r_r).float() == (p > 0.5).float()).float().sum(),
                                                    r_c.sum(), r_r.sum(), (r_c - r_r).sum()])
        common.sum_over_ranks(sums)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))  # inf: measure only
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        examples_seen += n_pairs
        loss, acc, chosen, rejected, margin = (sums / n_pairs).tolist()  # one sync per optimizer step
        common.check_step_loss(loss, desc, step + 1)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
        row = {"step": step + 1, "examples_seen": examples_seen, "loss": loss, "rewards/accuracies": acc,
               "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": margin,
               "grad_norm": float(grad_norm), "lr": lr}
        log.write(json.dumps(row) + "\n")
        if (step + 1) % args.log_every == 0 or step + 1 == len(steps):
            log.flush()
            tqdm.write(f"{desc} step {step + 1}/{len(steps)} loss {loss:.4f} acc {acc:.3f} "
                       f"margin {margin:.3f} grad_norm {float(grad_norm):.3f} lr {lr:.2e}")
        if evaluate and ((step + 1) % args.eval_every == 0 or step + 1 == len(steps)):
            evaluate(step + 1, examples_seen)  # scores under no_grad: the training itself is unchanged
    log.close()
    return steps


# ----------------------------------------------------------------------------------------------------
# one stage: train a fresh reward model, then predict

def encode(tok, pairs, max_len):
    """The reward is read at the text's last token, the response's own last token as in the paper's code (no
    EOS appended): there attention can compare the answer with the request directly."""
    return common.encode_pairs(tok, pairs, max_len, eos=False, keep_response_end=True)


def train_and_predict(stage_dir, *, model_path, max_len, pairs, targets, test_pairs, label_pairs, args, alpha,
                      evaluate=None):
    """Train a fresh reward model from `model_path` on ground-truth-oriented `pairs` with `targets` (P(chosen is
    better) by the labeller), write its test predictions and, if label_pairs is given, its labels on them.
    Soft targets keep pairs in ground-truth orientation without telling the student anything: the loss is
    symmetric under swapping chosen and rejected (Δ -> -Δ, p -> 1 - p); only the explicit term reads gt_agree.
    Returns the stage summary."""
    common.seed_everything(args.seed)
    device, autocast = common.device_and_autocast()
    tok = common.load_tokenizer(model_path)
    model = RewardModel(common.load_model(model_path, AutoModel, tok, device, args.grad_ckpt, args.pack))
    model = common.shard(model, args.fsdp_cpu_offload)  # torchrun: FSDP over the ranks; one process: unchanged
    max_len = min(max_len, common.model_max_len(model.body.config) or max_len)
    examples = [{"chosen": c, "rejected": r, "target": p, "gt_agree": True}
                for (c, r), p in zip(encode(tok, pairs, max_len), targets)]
    test_encoded = encode(tok, test_pairs, max_len)

    def test_margins():
        return score_pairs(model, test_encoded, tok.pad_token_id, args.micro_batch, autocast)
    train(model, examples, pad_id=tok.pad_token_id, args=args, log_path=stage_dir / "metrics.jsonl",
          autocast=autocast, alpha=alpha, desc=stage_dir.name,
          evaluate=evaluate and (lambda step, seen: evaluate(step, seen, test_margins())))
    model.eval()
    margins = test_margins()
    common.write_jsonl(stage_dir / "predictions.jsonl", common.prediction_rows(margins))
    summary = common.accuracy(margins)
    if label_pairs is not None:
        label_margins = score_pairs(model, encode(tok, label_pairs, max_len), tok.pad_token_id, args.micro_batch,
                                    autocast)
        common.write_jsonl(stage_dir / "labels.jsonl", common.label_rows(label_margins))
        summary["label_accuracy"] = common.accuracy(label_margins)["accuracy"]
    print(f"[{stage_dir.name}] test accuracy {summary['accuracy']:.4f} (ties {summary['ties']})")
    return summary


def run_bench(args):
    """make bench: one epoch of reward-model training on bench.py's fixed workload, timed."""
    args = dataclasses.replace(args, epochs=1)
    pairs, model_path = bench.workload(args)
    device, autocast = common.device_and_autocast()
    tok = common.load_tokenizer(model_path)
    model = RewardModel(common.load_model(model_path, AutoModel, tok, device, args.grad_ckpt, args.pack))
    examples = [{"chosen": c, "rejected": r, "target": 1.0, "gt_agree": True}
                for c, r in encode(tok, pairs, args.max_len)]
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "metrics.jsonl"
        if device.type == "cuda":  # kernels and the allocator warm up on one untimed step
            train(model, examples[:args.batch_size], pad_id=tok.pad_token_id, args=args, log_path=log_path,
                  autocast=autocast, alpha=0.0, desc="warm-up")
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        steps = train(model, examples, pad_id=tok.pad_token_id, args=args, log_path=log_path, autocast=autocast,
                      alpha=0.0, desc="bench rm")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    real, computed = bench.padded_tokens(steps, [common.row_lengths(common.example_texts(e), args.pack)
                                                      for e in examples])
    return bench.report("rm", model, seconds, len(examples), real, computed)


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
    run = common.start_run(args, "rm", code_files=[common.__file__, __file__])
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
    # 3. students: the strong model, fresh, on the labeller's soft labels p = sigmoid(margin) (BCE);
    #    implicit: plus ground-truth helpfulness pairs; explicit: plus alpha * the conflict term, the only
    #    place a student sees ground truth
    for setting in args.settings.split(","):
        pairs, targets = common.student_data(args, run.splits, labeller, with_helpful=setting == "implicit")
        alpha = args.alpha if setting == "explicit" else 0.0
        stages[f"student-{setting}"] = common.cached(
            run, f"student-{setting}", train_and_predict, role="strong", max_len=args.max_len,
            pairs=pairs, targets=targets, alpha=alpha, ceilings=stages)
    # 4. report: accuracies, PGR, the knowledge-space table and the deception score of each student
    return common.report(run, stages, "Reward modeling")


if __name__ == "__main__":
    main()
