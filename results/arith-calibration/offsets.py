"""Accuracy of each calibration stage split by what the near miss changes: pairs whose wrong answer differs from the
right one in its last digit (a ±1 or ±2 miss, which a last-digit rule can catch: the last digit of a sum, difference
or product follows from the operands' last digits) against pairs whose wrong answer keeps it (±10 or ±100, which
needs the carries and the magnitude). A model that learned only the last-digit rule is right on the first kind and
at chance on the second.

Run from the repository: python results/arith-calibration/offsets.py [FOLDER]   (default results/arith-calibration)
"""
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # common.py, arith.py
import common  # noqa: E402
import runs  # noqa: E402
import rm_w2s  # noqa: E402

ANSWER = re.compile(r"is (-?\d+)\.$")


def main(folder):
    print("| method | model | lr | last digit differs (±1, ±2) | last digit kept (±10, ±100) |")
    print("|---|---|---|---|---|")
    for config_file in sorted(Path(folder).glob("*/config.json")):
        config = json.loads(config_file.read_text())
        fields = {f for f in rm_w2s.Args.__dataclass_fields__}
        args = rm_w2s.Args(**{k: v for k, v in config.items() if k in fields})
        test = common.load_splits(args)[0]["test"]
        method = config.get("calibration", {}).get("method", config_file.parent.name.split("-")[0])
        for stage in ("zero-shot", "weak"):
            done = runs.read_stage(config_file.parent / stage)
            if done is None:
                continue
            right = defaultdict(lambda: [0, 0])
            for pair, row in zip(test, common.read_jsonl(config_file.parent / stage / "predictions.jsonl")):
                a, b = (int(ANSWER.search(pair[k]).group(1)) for k in ("chosen", "rejected"))
                kind = "differs" if (a - b) % 10 else "kept"
                right[kind][0] += row["correct"]
                right[kind][1] += 1
            cells = [f"{c / n:.3f} ({n})" for c, n in (right["differs"], right["kept"])]
            lr = "– (zero-shot)" if stage == "zero-shot" else f"{config['lr']:g}" + (
                f", {config['epochs']} epochs" if config["epochs"] != 1 else "")
            print(f"| {method} | {config['weak'].removeprefix('models/')} | {lr} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/arith-calibration")
