"""Why the reward head stays near chance on arithmetic (continued from probe.py): train the head ALONE on the frozen
body's features, the way rm_w2s.py trains it (zero init, no bias, AdamW without weight decay, batch 32, one epoch,
cosine decay from the rate, loss -log sigmoid(r_c - r_r)), over rates and training-set sizes, reading the final "."
(what the reward model reads) or the answer's last digit.

The reward model trains body and head at one rate. With a zero head the body's gradient is zero too, so the first
steps move only the head, by at most about the rate per step per weight (Adam): at 1e-4 over 32 steps a weight
moves 3e-3 at most. This asks whether that budget is what keeps the margins near 0 (a larger rate for the head, or
more steps, would then be the remedy), or whether no head on these features does better (then the body must change).

Run from the repository: OMP_NUM_THREADS=1 python results/arith-calibration/head.py MODEL [--n_gt 4000] [--n_val 1000]
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # probe.py beside it
from probe import feature_differences  # noqa: E402


def train_head(train_diff, val_diff, lr, batch=32, seed=0):
    """A zero head trained on the pairs' feature differences as rm_w2s.train would; returns
    (validation accuracy, mean |validation margin|, last step's mean training loss)."""
    w = torch.zeros(train_diff.shape[1], requires_grad=True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    order = torch.randperm(len(train_diff), generator=torch.Generator().manual_seed(seed))
    steps = math.ceil(len(order) / batch)
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay from lr, no warm-up (rm_w2s.py's defaults)
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = -F.logsigmoid(train_diff[order[step * batch:(step + 1) * batch]] @ w).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        margins = val_diff @ w
        return (margins > 0).float().mean().item(), margins.abs().mean().item(), loss.item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--n_gt", type=int, default=4000)
    p.add_argument("--n_val", type=int, default=1000)
    cli = p.parse_args()
    t0 = time.time()
    feats, _, n_val = feature_differences(cli.model, cli.n_gt, cli.n_val)
    result = {"model": cli.model, "n_val": n_val, "feature_seconds": round(time.time() - t0, 1),
              "mean_abs_feature_difference": {}, "heads": []}
    for where, k in (("final '.'", 0), ("last digit", 1)):
        diff = feats["gt"][:, k]
        result["mean_abs_feature_difference"][where] = diff.abs().mean().item()
        print(f"{cli.model}: {where}: mean |h_c - h_r| per feature {diff.abs().mean():.4f}, "
              f"norm {diff.norm(dim=1).mean():.3f}", flush=True)
        for n in (1000, len(diff)):
            for lr in (1e-4, 1e-3, 1e-2, 1e-1):
                acc, margin, loss = train_head(diff[:n], feats["test"][:, k], lr)
                result["heads"].append({"token": where, "train_pairs": n, "lr": lr, "steps": math.ceil(n / 32),
                                        "val_accuracy": acc, "mean_abs_margin": margin, "last_train_loss": loss})
                print(f"{cli.model}: {where}, {n} pairs ({math.ceil(n / 32)} steps), lr {lr:g}: validation "
                      f"{acc:.3f}, mean |margin| {margin:.4f}, last training loss {loss:.3f}", flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
