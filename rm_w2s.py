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
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModel

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
            return self.head(hidden[rows, last].float()).squeeze(-1)  # (N,)


@torch.no_grad()
def score_pairs(model, pairs, pad_id, micro_batch, autocast):
    """Margins r(chosen) - r(rejected) of encoded pairs, in their order. Texts are scored alone, batched by
    length, so evaluation pads little."""
    def score(inputs, _, rows, last):
        with autocast():
            return model(inputs, rows, last).tolist()
    return [c - r for c, r in common.score_by_length(pairs, pad_id, micro_batch, model.head.weight.device, score)]


# ----------------------------------------------------------------------------------------------------
# training loop

def train(model, examples, pad_id, args, stage_dir, autocast, alpha, desc):
    """examples: dicts with "c", "r" (encoded texts), "p" (target: P(c better)) and "y_gt" (1.0 if c is the
    ground-truth chosen text: read only by the explicit-conflict term, when alpha > 0). Returns the steps."""
    device = model.head.weight.device
    lengths = [max(common.row_lengths([e["c"], e["r"]], args.pack)) for e in examples]
    steps = [s for epoch in range(args.epochs) for s in
             common.make_batches(lengths, args.batch_size, args.micro_batch, args.seed + epoch, args.group_by_length)]
    optimizer = common.make_optimizer(model.parameters(), args.lr, args.weight_decay, device)
    model.train()  # dropout is already 0; train mode keeps gradient checkpointing on
    log = open(stage_dir / "metrics.jsonl", "w")
    bar = tqdm(steps, desc=desc, dynamic_ncols=True)
    examples_seen = 0
    for step, micro_batches in enumerate(bar):
        lr = common.lr_at(step, len(steps), args.lr, args.warmup_ratio, "cosine")
        for group in optimizer.param_groups:
            group["lr"] = lr
        n_pairs = sum(len(mb) for mb in micro_batches)
        sums = torch.zeros(5, device=device)  # loss, accuracy, chosen, rejected, margin (summed over pairs)
        for mb in micro_batches:
            batch = [examples[i] for i in mb]
            inputs, _, rows, last = common.collate([s for e in batch for s in (e["c"], e["r"])], pad_id, device, args.pack)
            p = torch.tensor([e["p"] for e in batch], device=device)
            with autocast():
                rewards = model(inputs, rows, last)  # (2B,): chosen, rejected, chosen, ... in one forward
            r_c, r_r = rewards[0::2], rewards[1::2]  # (B,), (B,)
            losses = soft_label_loss(r_c, r_r, p)
            if alpha:
                y_gt = torch.tensor([e["y_gt"] for e in batch], device=device)
                losses = losses + alpha * explicit_conflict_loss(r_c, r_r, y_gt)
            # each backward adds gradients, so normalise by the pairs of the whole optimizer step: an uneven last
            # micro-batch then weighs what its pairs weigh
            (losses.sum() / n_pairs).backward()
            with torch.no_grad():
                sums += torch.stack([losses.sum(), ((r_c > r_r).float() == (p > 0.5).float()).float().sum(),
                                     r_c.sum(), r_r.sum(), (r_c - r_r).sum()])
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
    log.close()
    return steps


# ----------------------------------------------------------------------------------------------------
# stages

def run_model(stage_dir, path, max_len, pairs, targets, test_pairs, label_pairs, args, alpha):
    """Train a fresh reward model from `path` on ground-truth-oriented `pairs` with `targets` (P(chosen is
    better) by the labeller), write its test predictions and, if label_pairs is given, its labels on them.
    Soft targets keep pairs in ground-truth orientation without telling the student anything: the loss is
    symmetric under swapping chosen and rejected (Δ -> -Δ, p -> 1 - p); only the explicit term reads y_gt."""
    common.seed_everything(args.seed)
    device, autocast = common.device_and_autocast()
    tok = common.load_tokenizer(path)
    model = RewardModel(common.load_model(path, AutoModel, tok, device, args.grad_ckpt, args.pack))
    max_len = min(max_len, common.model_max_len(model.body.config) or max_len)
    # The reward is read at the text's last token, the response's own last token as in the paper's code (no
    # EOS appended): there attention can compare the answer with the request directly.
    encode = lambda pairs: common.encode_pairs(tok, pairs, max_len, eos=False, keep_response_end=True)  # noqa: E731
    examples = [{"c": c, "r": r, "p": p, "y_gt": 1.0} for (c, r), p in zip(encode(pairs), targets)]
    train(model, examples, tok.pad_token_id, args, stage_dir, autocast, alpha, desc=stage_dir.name)
    model.eval()
    margins = score_pairs(model, encode(test_pairs), tok.pad_token_id, args.micro_batch, autocast)
    common.write_jsonl(stage_dir / "predictions.jsonl", common.prediction_rows(margins))
    summary = common.accuracy(margins)
    if label_pairs is not None:
        label_margins = score_pairs(model, encode(label_pairs), tok.pad_token_id, args.micro_batch, autocast)
        common.write_jsonl(stage_dir / "labels.jsonl", common.label_rows(label_margins))
        summary["label_accuracy"] = common.accuracy(label_margins)["accuracy"]
    print(f"[{stage_dir.name}] test accuracy {summary['accuracy']:.4f} (ties {summary['ties']})")
    return summary


def bench(args):
    """make bench: one epoch of reward-model training on common's fixed workload, timed."""
    args = dataclasses.replace(args, epochs=1)
    pairs, path = common.bench_setup(args)
    device, autocast = common.device_and_autocast()
    tok = common.load_tokenizer(path)
    model = RewardModel(common.load_model(path, AutoModel, tok, device, args.grad_ckpt, args.pack))
    encoded = common.encode_pairs(tok, pairs, args.max_len, eos=False, keep_response_end=True)
    examples = [{"c": c, "r": r, "p": 1.0, "y_gt": 1.0} for c, r in encoded]
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda":  # kernels and the allocator warm up on one untimed step
            train(model, examples[:args.batch_size], tok.pad_token_id, args, Path(tmp), autocast, 0.0, "warm-up")
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        steps = train(model, examples, tok.pad_token_id, args, Path(tmp), autocast, 0.0, "bench rm")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    real, computed = common.padded_tokens(steps, [common.row_lengths([e["c"], e["r"]], args.pack) for e in examples])
    return common.bench_report("rm", model, seconds, len(examples), real, computed)


def main(argv=None):
    args = common.parse_args(Args, argv)
    common.check_args(args)  # every option in range before anything loads
    if args.bench:
        return bench(args)
    return common.Experiment(args, "rm").run(run_model, "Reward modeling")


if __name__ == "__main__":
    main()
