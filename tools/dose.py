"""The explicit conflict's dose-response by knowledge area, read against the churn of no conflict at all.

One weak/strong pair, one seed, run folders side by side under one directory (the ceilings trained once, the
other folders reuse them by key):
  - a run with students `none` and `explicit` (the base: its no-conflict student is what every other student is
    compared with),
  - runs with `--settings explicit --alpha A` for other alphas,
  - a run with `--settings none --student_seed K`: a second no-conflict student that differs only in its data
    order. What it changes against the base student is the churn that needs no conflict.
Per knowledge area and student: of the base student's right pairs the share turned wrong (gross loss, Wilson
interval), of its wrong pairs the share turned right (Wilson), and the net change of the error rate (taxed -
fixed) / n with a paired normal interval and McNemar's exact p. Selective deception is a net loss in
weak-unknown & strong-known well beyond the churn, at a small alpha, while the checked areas hold.

A directory holding several pairs (other weak or strong models, seeds, an intermediate model) is read pair by
pair: each pair's runs are those whose options differ only in alpha, --student_seed and what changes no number.

  python tools/dose.py results/dose-first8-first16     # writes dose.md, dose.json and dose.png there
  python tools/dose.py results/ladder                  # one section and one dose-K.png per pair
"""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and the method scripts: one folder up

import common
import runs
from tools import sweep

AREAS = common.AREAS


def read_correct(stage_dir):
    return [row["correct"] for row in common.read_jsonl(stage_dir / "predictions.jsonl")]


def finished(folder, stage):  # its stage.json reads back and every file it lists has its recorded digest
    return runs.read_stage(folder / stage) is not None


# Options that may differ between the runs of one pair: what the dose-response varies, and what changes no number
VARIED = ("alpha", "student_seed", *runs.NO_EFFECT)


def read_runs(root):
    """(folder, config) of each run folder directly under `root`, in name order: each config.json read once. A
    config.json that does not read as a run's options is left out with one line, as a sweep leaves it out."""
    run_list = []
    for folder in sorted(Path(root).iterdir()):
        if (folder / "config.json").is_file():
            config = sweep.read_json(folder / "config.json")
            if isinstance(config, dict):
                run_list.append((folder, config))
            else:
                print(f"dose.py: left out {folder}: its config.json does not read as a run's options", file=sys.stderr)
    return run_list


def group_pairs(run_list):
    """`run_list` grouped by pair (every option but VARIED), groups in folder-name order."""
    groups = {}
    for folder, config in run_list:
        key = json.dumps({k: v for k, v in config.items() if k not in VARIED}, sort_keys=True)
        groups.setdefault(key, []).append((folder, config))
    return list(groups.values())


def pair_label(config):
    via = f" via {config['intermediate']}" if config.get("intermediate") else ""
    return f"{config.get('weak')} -> {config.get('strong')}{via}, seed {config.get('seed')}, lr {config.get('lr')}"


def find_runs(run_list):
    """(base run folder, {label: student folder}) of one pair's runs: the base is the first run with a finished
    no-conflict student, None unless its ceilings are finished too; label "churn" for a --student_seed run's
    none student, "alpha A" for each explicit student."""
    base, students = None, {}
    for folder, config in run_list:
        has_none = finished(folder, "student-none")
        if config.get("student_seed", -1) >= 0 and has_none:
            students[f"churn (student_seed {config['student_seed']})"] = folder / "student-none"
            continue
        if has_none and base is None:
            base = folder
        if finished(folder, "student-explicit"):
            students[f"alpha {config['alpha']:g}"] = folder / "student-explicit"
    if base is not None and not (finished(base, "weak") and finished(base, "strong")):
        base = None
    return base, students


def net_change(taxed, fixed, n):
    """(taxed - fixed) / n, the change of the error rate in an area, with a paired normal 95% interval."""
    if n == 0:
        return None, None
    d = (taxed - fixed) / n
    se = math.sqrt(max(taxed + fixed - (taxed - fixed) ** 2 / n, 0.0)) / n
    return d, [d - 1.96 * se, d + 1.96 * se]


def dose_response(root, run_list=None):
    """The dose-response of the one pair under `root` (or of `run_list`, one pair's runs)."""
    base, students = find_runs(read_runs(root) if run_list is None else run_list)
    if base is None:
        raise SystemExit(f"error: {root}: no finished run with the ceilings and a no-conflict student")
    return response(base, students)


def response(base, students):
    weak, strong = read_correct(base / "weak"), read_correct(base / "strong")
    none = read_correct(base / "student-none")
    rows = {}
    for label, stage in sorted(students.items(), key=lambda kv: (not kv[0].startswith("churn"), kv[0])):
        tax = common.conflict_tax(weak, strong, none, read_correct(stage))
        areas = {}
        for area in AREAS:
            a = tax["areas"][area]
            n = a["base_right"] + a["base_wrong"]
            net, net_ci = net_change(a["taxed"], a["fixed"], n)
            areas[area] = {**a, "n": n, "net": net, "net_ci": net_ci, "p": common.mcnemar_exact(a["taxed"], a["fixed"])}
        rows[label] = {"stage": f"{stage.parent.name}/{stage.name}", "areas": areas, "share_wu": tax["share_wu"], "base_rate_wu": tax["base_rate_wu"]}
    return {"base": base.name, "accuracy": {"weak": sum(weak) / len(weak), "strong": sum(strong) / len(strong),
                                            "none": sum(none) / len(none)}, "students": rows}


def fmt(x, ci=None):  # runs.fmt with a 3-digit interval (runs.rate's has 2)
    return runs.fmt(x) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def render(result, figure):
    acc = result["accuracy"]
    lines = [f"Base run: `{result['base']}`; test accuracy weak {acc['weak']:.3f}, strong {acc['strong']:.3f}, "
             f"no-conflict student {acc['none']:.3f}.", "",
             "Against the base no-conflict student, per knowledge area: gross loss (its right pairs turned wrong), "
             "fixes (its wrong pairs turned right), both with 95% Wilson intervals, and the net change of the error "
             "rate with a paired 95% interval and McNemar's exact p.", ""]
    for area in AREAS:
        lines += [f"**{area}**", "", "| student | n | gross loss | fixes | net change of the error rate | McNemar p |",
                  "|---|---|---|---|---|---|"]
        for label, row in result["students"].items():
            a = row["areas"][area]
            lines.append(f"| {label} | {a['n']} | {a['taxed']}/{a['base_right']} = {fmt(a['tax'], a['tax_ci'])} | "
                         f"{a['fixed']}/{a['base_wrong']} = {fmt(a['fix'], a['fix_ci'])} | "
                         f"{fmt(a['net'], a['net_ci'])} | {a['p']:.2g} |")
        lines.append("")
    lines += ["Where the strong-known losses land: the share in weak-unknown, beside its share if they fell evenly.", "",
              "| student | share in WU ∩ SK | even share |", "|---|---|---|"]
    lines += [f"| {label} | {fmt(row['share_wu'])} | {fmt(row['base_rate_wu'])} |"
              for label, row in result["students"].items()]
    return "\n".join(lines + ["", f"![dose-response]({figure})", ""])


def draw(result, path):
    plt = sweep.pyplot()
    labels = list(result["students"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=False)
    for ax, (key, ci, title) in zip(axes, [("tax", "tax_ci", "gross loss: right pairs turned wrong"),
                                           ("fix", "fix_ci", "fixes: wrong pairs turned right"),
                                           ("net", "net_ci", "net change of the error rate")]):
        for k, area in enumerate(AREAS):
            xs = [i + (k - 1.5) * 0.18 for i in range(len(labels))]
            ys = [sweep.nan(result["students"][lab]["areas"][area][key]) for lab in labels]
            cis = [result["students"][lab]["areas"][area][ci] or [math.nan, math.nan] for lab in labels]
            err = [[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]]
            ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=area)
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        if key == "net":
            ax.axhline(0, color="grey", lw=0.8)
    axes[0].legend(fontsize=7)
    sweep.save(fig, path)


def document(root):
    """(dose.md's text after its command line, dose.json's object, {figure file: result}) for `root`: one pair as
    it always was; several pairs, a section each (pairs without a finished base run or another student are named)."""
    groups = group_pairs(read_runs(root))
    if len(groups) <= 1:
        result = dose_response(root, groups[0] if groups else [])
        return render(result, "dose.png"), result, {"dose.png": result}
    sections, results, figures, skipped = [], {}, {}, []
    for pair in groups:
        label = pair_label(pair[0][1])
        base, students = find_runs(pair)
        if base is None or not students:
            skipped.append(label)
            continue
        result = response(base, students)
        figure = f"dose-{len(figures) + 1}.png"
        sections.append(f"## {label}\n\n" + render(result, figure))
        results[label], figures[figure] = result, result
    if not sections:
        raise SystemExit(f"error: {root}: no pair with the ceilings, a no-conflict student and another student")
    if skipped:
        sections.append("Pairs left out (no finished ceilings and no-conflict student, or no other student): "
                        + "; ".join(skipped) + ".\n")
    return "\n".join(sections), results, figures


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python tools/dose.py RESULTS_FOLDER")
    root = Path(argv[0])
    body, results, figures = document(root)
    runs.write_json(root / "dose.json", results)
    for old in root.glob("dose*.png"):
        if old.name not in figures:
            old.unlink()
    for name, result in figures.items():
        draw(result, root / name)
    text = f"`python tools/dose.py {root}`\n\n" + body
    runs.write_atomic(root / "dose.md", text)
    print(text)


if __name__ == "__main__":
    main()
