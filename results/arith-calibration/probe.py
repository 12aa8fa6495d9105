"""Why a reward head stays near chance on arithmetic where the model's likelihood does not: a linear probe on the
frozen body's last hidden state, read where the reward model reads it (the response's own last token, the final
".") and one token earlier (the answer's last digit).

A reward model's margin is w · (h(chosen) - h(rejected)) at its start; if no w separates the frozen features, a
head trained for a few dozen steps cannot either, and reading another token (or training the body for longer) is
what would help. Fits an L2-regularised logistic regression on the gt pairs' feature differences (both
orientations, so no bias is needed) and scores the validation pairs: the share with w · (h_c - h_r) > 0.

Run from the repository: OMP_NUM_THREADS=1 python results/arith-calibration/probe.py MODEL [--n_gt 1000] [--n_val 1000]
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the method scripts and common.py
import common  # noqa: E402
import rm_w2s  # noqa: E402
import runs  # noqa: E402


@torch.no_grad()
def features(body, encoded, pad_id, micro_batch=16):
    """(N, 2, H) last hidden states of each text at its last token (-1) and one earlier (-2), in fp32."""
    out = []
    for i in range(0, len(encoded), micro_batch):
        texts = [t.ids for t in encoded[i:i + micro_batch]]
        width = max(map(len, texts))
        ids = torch.tensor([t + [pad_id] * (width - len(t)) for t in texts])
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts])
        with common.autocast("bf16")():
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        last = torch.tensor([len(t) - 1 for t in texts])
        rows = torch.arange(len(texts))
        out.append(torch.stack([hidden[rows, last], hidden[rows, last - 1]], 1))
    return torch.cat(out)


def probe(train_diff, val_diff, l2, steps=300):
    """Logistic regression on differences d (label 1) and -d (label 0); returns validation accuracy."""
    x = torch.cat([train_diff, -train_diff])
    y = torch.cat([torch.ones(len(train_diff)), torch.zeros(len(train_diff))])
    scale = x.std(0) + 1e-6
    x = x / scale
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + l2 * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return ((val_diff / scale) @ w > 0).float().mean().item(), ((x @ w > 0).float() == y).float().mean().item()


def feature_differences(model_name, n_gt, n_val):
    """The frozen body's chosen - rejected features of the arith gt and validation pairs ({"gt", "test"}: (N, 2, H),
    at the last token and one earlier), read as the reward model reads them; and the validation pairs' count."""
    args = rm_w2s.Args(data="arith:val", n_gt=n_gt, n_w2s=32, n_test=n_val, precision="bf16", compile="off",
                       settings="none", pack=False)  # texts alone, padded on the right
    splits, _ = common.load_splits(args)
    path = runs.resolve_models(dataclasses.replace(args, weak=model_name, strong=model_name), splits)["weak"]
    model, tok = rm_w2s.load(path, args, common.device())
    body = model.body.eval()
    feats = {}
    for split in ("gt", "test"):
        encoded = rm_w2s.encode(tok, splits[split], args.max_len)
        f = features(body, [t for pair in encoded for t in pair], tok.pad_token_id)
        feats[split] = f[0::2] - f[1::2]  # (N, 2, H): chosen minus rejected
    return feats, len(splits["gt"]), len(splits["test"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--n_gt", type=int, default=1000)
    p.add_argument("--n_val", type=int, default=1000)
    cli = p.parse_args()
    t0 = time.time()
    feats, n_gt, n_val = feature_differences(cli.model, cli.n_gt, cli.n_val)
    result = {"model": cli.model, "n_gt": n_gt, "n_val": n_val, "probes": {}}
    for where, k in (("last token (the final '.')", 0), ("one before it (the answer's last digit)", 1)):
        for l2 in (1e-3, 1e-2, 1e-1, 1.0):
            val_acc, train_acc = probe(feats["gt"][:, k], feats["test"][:, k], l2)
            result["probes"][f"{where}, l2 {l2}"] = {"val_accuracy": val_acc, "train_accuracy": train_acc}
            print(f"{cli.model}: {where}, l2 {l2}: train {train_acc:.3f}, validation {val_acc:.3f}", flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
