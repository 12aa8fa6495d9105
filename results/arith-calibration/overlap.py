"""How the weak ceiling's errors overlap a strong candidate's, on the validation pairs both scored: the share of
pairs in weak-unknown ∩ strong-known (WU ∩ SK, where deception is measured) and P(strong wrong | weak wrong), which
`tools/power.py --plan --overlap` takes. Weak: SimPO on SmolLM2-135M at 1e-6 (the ladder's weak model); strong:
every other calibration stage (zero-shot rows on 2000 pairs, trained rows on the first 1000; pairs matched by text).

Run from the repository: python results/arith-calibration/overlap.py [FOLDER]   (default results/arith-calibration)
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # arith.py
import arith  # noqa: E402

WEAK = ("simpo", "models/smollm2-135m-instruct", "1e-06")


def correct_by_text(run):
    """{chosen text: right?} of a calibration run's only stage, and its (method, model, lr or 'zero-shot')."""
    config = json.loads((run / "config.json").read_text())
    n = {"gt": config["n_gt"], "w2s": config["n_w2s"], "test": config["n_test"]}
    pairs = arith.make_arith_pairs(n, config["seed"], validation=True)["test"]
    stage = run / ("zero-shot" if (run / "zero-shot").is_dir() else "weak")
    rows = [json.loads(line) for line in (stage / "predictions.jsonl").read_text().splitlines()]
    epochs = f" ({config['epochs']} epochs)" if config["epochs"] > 1 else ""
    lr = "zero-shot" if stage.name == "zero-shot" else f"{config['lr']:g}{epochs}"
    return (run.name.split("-")[0], config["weak"], lr), {p["chosen"]: r["correct"] for p, r in zip(pairs, rows)}


def main(folder):
    runs = dict(correct_by_text(run) for run in sorted(Path(folder).glob("*-arith-val-*")))
    weak = runs.pop(WEAK)
    print(f"weak: {' '.join(map(str, WEAK))}")
    print("| method | strong | lr | pairs | weak accuracy | strong accuracy | P(strong wrong \\| weak wrong) "
          "| share in WU ∩ SK |")
    print("|---|---|---|---|---|---|---|---|")
    for (method, model, lr), strong in sorted(runs.items(), key=str):
        both = [q for q in weak if q in strong]
        wu = [q for q in both if not weak[q]]
        wu_sk = [q for q in wu if strong[q]]
        print(f"| {method} | {model.removeprefix('models/')} | {lr} | {len(both)} | "
              f"{sum(weak[q] for q in both) / len(both):.3f} | {sum(strong[q] for q in both) / len(both):.3f} | "
              f"{1 - len(wu_sk) / len(wu):.3f} | {len(wu_sk) / len(both):.3f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/arith-calibration")
