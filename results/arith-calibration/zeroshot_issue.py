"""Zero-shot two-digit addition check of issue 46: summed log-prob of "Question: What is a + b?\nAnswer: c",
right c against a near miss c +- 1, 2 or 10; 200 random additions (seed 0); fp32, one thread.
Run from the repository: OMP_NUM_THREADS=1 python results/arith-calibration/zeroshot_issue.py MODEL[:firstK]"""
import random, sys, time
import torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # pretrained.py
import pretrained
from transformers import AutoModelForCausalLM, AutoTokenizer

name = sys.argv[1]
path = pretrained.resolve(name, "runs")  # a :firstK cut is written once under runs/models
t0 = time.time()
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
load_s = time.time() - t0
rng = random.Random(0)
items = []
for _ in range(200):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    c = a + b
    wrong = c + rng.choice([-10, -2, -1, 1, 2, 10])
    items.append((a, b, c, wrong))
texts = [f"Question: What is {a} + {b}?\nAnswer: {x}" for a, b, c, w in items for x in (c, w)]

@torch.no_grad()
def logps(batch):
    enc = tok(batch, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    lp = logits.log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
    return (lp * mask[:, 1:]).sum(1)

tok.padding_side = "right"
t0 = time.time()
scores = torch.cat([logps(texts[i:i + 40]) for i in range(0, len(texts), 40)])
score_s = time.time() - t0
right, wrong = scores[0::2], scores[1::2]
acc = (right > wrong).float().mean().item()
print(f"{name}: layers {model.config.num_hidden_layers}, zero-shot accuracy {acc:.3f} ({int((right > wrong).sum())}/200, "
      f"ties {int((right == wrong).sum())}), scoring {score_s:.1f} s, load {load_s:.1f} s")
