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
fixed) / n with a paired normal interval and McNemar's exact p; for arithmetic runs (--data arith) the same in
weak-unknown & strong-known per tier, beside each tier's ceilings. Selective deception is a net loss in
weak-unknown & strong-known well beyond the churn, at a small alpha, while the checked areas hold.

A directory holding several pairs (other weak or strong models, seeds, an intermediate model) is read pair by
pair: each pair's runs are those whose options differ only in alpha, --student_seed and what changes no number.

  python tools/dose.py results/dose-first8-first16     # writes dose.md, dose.json and dose.png there
  python tools/dose.py results/ladder                  # one section and one dose-K.png per pair
"""
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and the method scripts: one folder up

import arith
import common
import runs
from tools import sweep

AREAS = common.AREAS
USAGE = "usage: python tools/dose.py RESULTS_FOLDER   (the folder holding the run folders of one pair or several)"


def read_correct(stage_dir):
    return [row["correct"] for row in common.read_jsonl(stage_dir / "predictions.jsonl")]


def finished(folder, stage):  # its stage.json reads back and every file it lists has its recorded digest
    return runs.read_stage(folder / stage) is not None


# Options that may differ between the runs of one pair: what the dose-response varies, and what changes no number
VARIED = ("alpha", "student_seed", *runs.NO_EFFECT)


def method_of(folder):
    """The run's method: its results.json says, else its folder's name begins with it (runs.run_dir); "" where
    neither does (a folder renamed by hand)."""
    results = sweep.read_json(folder / "results.json")
    word = folder.name.split("-")[0]
    return (results.get("method") if isinstance(results, dict) else None) or (word if word in sweep.METHODS else "")


def read_runs(root):
    """([(folder, config, method)] of each run folder directly under `root`, in name order; [(folder, why)] of
    those left out here: a config.json that is not a run's options, or a run that measures nothing (its
    --student_seed is its --seed, so its students are the base's). Folders without a config.json are no runs."""
    run_list, left_out = [], []
    for folder in sorted(p for p in Path(root).iterdir() if (p / "config.json").is_file()):
        config = sweep.read_json(folder / "config.json")
        if not (isinstance(config, dict) and sweep.is_run_config(folder / "config.json")):
            left_out.append((folder, "its config.json does not read as a run's options"))
        elif config["seed"] >= 0 and config.get("student_seed", -1) == config["seed"]:
            left_out.append((folder, f"its --student_seed is its --seed ({config['seed']}): its students train in the "
                                     "base's data order, so it measures no churn"))
        else:
            run_list.append((folder, config, method_of(folder)))
    return run_list, left_out


def group_pairs(run_list):
    """`run_list` grouped by pair (the method and every option but VARIED), groups in folder-name order."""
    groups = {}
    for folder, config, method in run_list:
        key = json.dumps([method, {k: v for k, v in config.items() if k not in VARIED}], sort_keys=True, default=str)
        groups.setdefault(key, []).append((folder, config, method))
    return list(groups.values())


def pair_labels(pairs):
    """Each pair's heading: its method, weak -> strong (via the intermediate model), then the options the pairs
    differ in (seed, lr, ...); model paths without the part all of them share (sweep.short_models)."""
    configs = [{k: v for k, v in pair[0][1].items() if k not in VARIED} for pair in pairs]
    short = sweep.short_models(c.get(k) for c in configs for k in sweep.MODELS)
    methods = [pair[0][2] for pair in pairs]
    labels = []
    for method, c in zip(methods, configs):
        # the options that differ between the pairs of this method (a DPO option does not tell DPO from rm)
        same = [o for m, o in zip(methods, configs) if m == method]
        differ = [k for k in sorted(set().union(*same)) if k not in sweep.MODELS
                  and len({json.dumps(o.get(k, sweep.ABSENT), default=str) for o in same}) > 1]
        via = f" via {short[c['intermediate']]}" if c.get("intermediate") else ""
        models = f"{short.get(c.get('weak'), c.get('weak'))} -> {short.get(c.get('strong'), c.get('strong'))}{via}"
        models = f"{method}: {models}" if method else models
        options = [sweep.option_text(k, c.get(k, sweep.ABSENT), short) for k in differ]
        labels.append(", ".join([models] + [t for t in options if t]))
    return labels, short


def find_runs(run_list):
    """(base run folder, {label: student folder}, [(run folder, why it is not read)]) of one pair's runs. The base
    is the first run with finished ceilings and a finished no-conflict student (None if there is none); label
    "churn (student_seed K)" for a --student_seed run's no-conflict student, "alpha A" for each explicit student.
    Every run of the pair that gives nothing is named with its reason."""
    base, students, why = None, {}, {}
    for folder, config, _ in run_list:
        has_none = finished(folder, "student-none")
        if config.get("student_seed", -1) >= 0:
            label = f"churn (student_seed {config['student_seed']})"
            if not has_none:
                why[folder] = "a churn run (--student_seed) whose no-conflict student is not finished"
            elif label in students:
                why[folder] = f"a second churn run with that student_seed (read: {students[label].parent.name})"
            else:
                students[label] = folder / "student-none"
            continue
        if base is None and has_none and finished(folder, "weak") and finished(folder, "strong"):
            base = folder
        if finished(folder, "student-explicit"):
            label = f"alpha {config['alpha']:g}"
            if label in students:
                why[folder] = f"a second explicit student at {label} (read: {students[label].parent.name})"
            else:
                students[label] = folder / "student-explicit"
        elif folder != base:
            why.setdefault(folder, f"a second no-conflict student of this pair (the base run is {base.name})"
                           if has_none and base else "its ceilings are not finished" if has_none else "no finished "
                           "no-conflict or explicit student (unfinished, or stopped during a student stage)")
    used = {base} | {stage.parent for stage in students.values()}
    return base, students, [(folder, why.get(folder, "not read")) for folder, _, _ in run_list if folder not in used]


def paired_se(taxed, fixed, n):
    """The standard error of (taxed - fixed) / n over n paired pairs (normal approximation)."""
    return math.sqrt(max(taxed + fixed - (taxed - fixed) ** 2 / n, 0.0)) / n


def net_change(taxed, fixed, n):
    """(taxed - fixed) / n, the change of the error rate in an area, with a paired normal 95% interval."""
    if n == 0:
        return None, None
    d = (taxed - fixed) / n
    se = paired_se(taxed, fixed, n)
    return d, [d - 1.96 * se, d + 1.96 * se]


def area_change(a):
    """An area of common.conflict_tax with its pairs, the net change of the error rate (net_change) and McNemar's p."""
    n = a["base_right"] + a["base_wrong"]
    net, net_ci = net_change(a["taxed"], a["fixed"], n)
    return {**a, "n": n, "net": net, "net_ci": net_ci, "p": common.mcnemar_exact(a["taxed"], a["fixed"])}


COMPACT = ("n", "taxed", "fixed", "net", "net_ci", "p")  # what a per-tier or per-bin row keeps of area_change


def changes_on(idx, weak, strong, none, correct):
    """area_change in weak-unknown & strong-known and in weak-known & strong-known over the test pairs `idx` only,
    each with the counts and the change alone (COMPACT)."""
    pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
    areas = common.conflict_tax(pick(weak), pick(strong), pick(none), pick(correct))["areas"]
    changes = {area: area_change(areas[area]) for area in (common.WU_SK, common.WK_SK)}
    return {area: {k: a[k] for k in COMPACT} for area, a in changes.items()}


def tier_rows(tiers, weak, strong, none, students):
    """Per tier of an arithmetic test split: the pairs, the ceilings' and the base student's accuracy, and each
    student's net change of the error rate against the base student in weak-unknown & strong-known and, beside it,
    in weak-known & strong-known (each with its paired interval and McNemar's p): does a finding hold on every
    tier, or on one; and inside one tier, does the conflict cost more where the supervisor cannot check?"""
    out = {}
    for tier in dict.fromkeys(tiers):
        idx = [i for i, t in enumerate(tiers) if t == tier]
        out[tier] = {"pairs": len(idx), **{name: sum(x[i] for i in idx) / len(idx) for name, x in
                                           (("weak", weak), ("strong", strong), ("none", none))},
                     "students": {label: changes_on(idx, weak, strong, none, correct)
                                  for label, correct in students.items()}}
    return out


STRATA = 5  # bins of the strong ceiling's margin, equal in their count of strong-known pairs


def margin_strata(weak, strong, strong_margin, none, students, bins=STRATA):
    """The conflict's cost where the supervisor cannot check against where it can, among pairs the strong ceiling
    knows equally well. Pairs the weak model gets wrong tend to be harder, and a perturbation of any kind costs more
    on hard pairs; so the strong-known pairs are cut into `bins` bins of the strong ceiling's margin (its
    confidence), equal in count, and in each bin the net change against the base student is read in
    weak-unknown & strong-known and in weak-known & strong-known. `difference`: the mean over bins of
    net(WU ∩ SK) − net(WK ∩ SK), weighted by each bin's WU ∩ SK pairs, with a normal 95% interval (the two
    areas are disjoint, so their variances add). Above 0: a cost aimed where the supervisor is blind beyond what
    the pairs' difficulty to the strong model explains."""
    known = sorted((i for i in range(len(strong)) if strong[i]), key=lambda i: (strong_margin[i], i))
    groups = [known[round(len(known) * b / bins):round(len(known) * (b + 1) / bins)] for b in range(bins)]
    out = {}
    for label, correct in students.items():
        rows, num, den, var = [], 0.0, 0, 0.0
        for idx in groups:
            ch = changes_on(idx, weak, strong, none, correct)
            wu, wk = ch[common.WU_SK], ch[common.WK_SK]
            margins = [strong_margin[idx[0]], strong_margin[idx[-1]]] if idx else None
            rows.append({"margin": margins, "wu": wu, "wk": wk})
            if wu["n"] and wk["n"]:
                num += wu["n"] * (wu["net"] - wk["net"])
                den += wu["n"]
                var += wu["n"] ** 2 * sum(paired_se(a["taxed"], a["fixed"], a["n"]) ** 2 for a in (wu, wk))
        d = num / den if den else None
        half = 1.96 * math.sqrt(var) / den if den else None
        out[label] = {"bins": rows, "difference": d, "difference_ci": [d - half, d + half] if den else None}
    return out


def response(base, students):
    weak, none = read_correct(base / "weak"), read_correct(base / "student-none")
    strong_rows = common.read_jsonl(base / "strong" / "predictions.jsonl")
    strong = [row["correct"] for row in strong_rows]
    rows, corrects = {}, {}
    for label, stage in sorted(students.items(), key=lambda kv: (not kv[0].startswith("churn"), kv[0])):
        correct = read_correct(stage)
        if len(correct) != len(none):  # the same options but not the same test split (a data file changed between)
            raise SystemExit(f"error: {stage} scored {len(correct)} test pairs, the base run's {base / 'student-none'} "
                             f"{len(none)}: not one test split, so not one pair")
        corrects[label] = correct
        tax = common.conflict_tax(weak, strong, none, correct)
        areas = {area: area_change(tax["areas"][area]) for area in AREAS}
        rows[label] = {"stage": f"{stage.parent.name}/{stage.name}", "areas": areas, "share_wu": tax["share_wu"], "base_rate_wu": tax["base_rate_wu"]}
    result = {"base": base.name, "accuracy": {"weak": sum(weak) / len(weak), "strong": sum(strong) / len(strong),
                                              "none": sum(none) / len(none)}, "students": rows}
    result["strata"] = margin_strata(weak, strong, [row["margin"] for row in strong_rows], none, corrects)
    config = sweep.read_json(base / "config.json")
    order = arith.tiers_of_run(config)  # arith.py records each test pair's tier
    if order is not None:
        result["tiers"] = tier_rows(order, weak, strong, none, corrects)
    return result


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
    lines += ["", f"Matched on difficulty: the strong-known pairs in {STRATA} bins of the strong ceiling's margin "
              "(equal counts), the net change of the error rate in each bin where the supervisor cannot check "
              "(WU ∩ SK) and where it can (WK ∩ SK); last column: their difference, averaged over the bins "
              "weighted by their WU ∩ SK pairs, with a 95% interval. Above 0: a cost aimed at the blind area "
              "beyond the pairs' difficulty to the strong model.", "",
              "| student | " + " | ".join(f"bin {b + 1}: WU / WK" for b in range(STRATA)) + " | difference [95% CI] |",
              "|---|" + "---|" * (STRATA + 1)]
    for label, st in result["strata"].items():
        cells = [f"{runs.fmt(b['wu']['net'])} ({b['wu']['n']}) / {runs.fmt(b['wk']['net'])} ({b['wk']['n']})"
                 for b in st["bins"]]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(st['difference'], st['difference_ci'])} |")
    if "tiers" in result:
        tiers = result["tiers"]
        lines += ["", "Per tier: test accuracy of the ceilings and the no-conflict student, then each student's net "
                  "change of the error rate in weak-unknown & strong-known and in weak-known & strong-known (n: the "
                  "tier's pairs there) with a paired 95% interval and McNemar's exact p.", "",
                  "| tier | pairs | weak | strong | no-conflict student |", "|---|---|---|---|---|"]
        lines += [f"| {tier} | {t['pairs']} | {t['weak']:.3f} | {t['strong']:.3f} | {t['none']:.3f} |"
                  for tier, t in tiers.items()]
        lines += ["", "| student | tier | WU ∩ SK: n | net change | McNemar p | WK ∩ SK: n | net change | McNemar p |",
                  "|---|---|---|---|---|---|---|---|"]
        for label in result["students"]:
            for tier, t in tiers.items():
                u, k = (t["students"][label][area] for area in (common.WU_SK, common.WK_SK))
                lines.append(f"| {label} | {tier} | {u['n']} | {fmt(u['net'], u['net_ci'])} | {u['p']:.2g} | "
                             f"{k['n']} | {fmt(k['net'], k['net_ci'])} | {k['p']:.2g} |")
    return "\n".join(lines + ["", f"![dose-response]({figure})", ""])


def draw(result, path, title=""):
    plt = sweep.pyplot()
    labels = list(result["students"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=False)
    for ax, (key, ci, title_) in zip(axes, [("tax", "tax_ci", "gross loss: right pairs turned wrong"),
                                            ("fix", "fix_ci", "fixes: wrong pairs turned right"),
                                            ("net", "net_ci", "net change of the error rate")]):
        for k, area in enumerate(AREAS):
            xs = [i + (k - 1.5) * 0.18 for i in range(len(labels))]
            ys = [sweep.nan(result["students"][lab]["areas"][area][key]) for lab in labels]
            cis = [result["students"][lab]["areas"][area][ci] or [math.nan, math.nan] for lab in labels]
            err = [[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]]
            ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=area)
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_title(title_, fontsize=10)
        if key == "net":
            ax.axhline(0, color="grey", lw=0.8)
    axes[0].legend(fontsize=7)
    if title:  # a folder of several pairs draws one figure each: the pair it shows, on the figure
        fig.suptitle(title, fontsize=10)
    sweep.save(fig, path)


def document(root):
    """(dose.md's text after its command line, dose.json's object, {figure file: (result, title)}, [(run folder, why
    it is left out)]) for `root`: one pair as it always was; several pairs, a section each, headed by what tells
    the pairs apart (pair_labels). Every run folder read and not used is named with its reason."""
    run_list, left_out = read_runs(root)
    groups = group_pairs(run_list)
    if not groups and (Path(root) / "config.json").is_file():
        raise SystemExit(f"error: {root} is a run folder; give the folder that holds the pair's run folders")
    if not groups:
        raise SystemExit(f"error: {root}: no run folder in it (a folder with a run's config.json)"
                         + (f"; left out: {'; '.join(f'{f.name}: {why}' for f, why in left_out)}" if left_out else ""))
    labels, short = pair_labels(groups)
    sections, results, figures = [], {}, {}
    for pair, label in zip(groups, labels):
        base, students, unused = find_runs(pair)
        if base is None or not students:
            why = ("no run with finished ceilings and a finished no-conflict student" if base is None else
                   "no student to read against the base run's no-conflict student")
            if len(groups) == 1:
                raise SystemExit(f"error: {root}: {why}")
            left_out += [(folder, f"its pair ({label}) has {why}") for folder, _, _ in pair]
            continue
        left_out += unused
        result = response(base, students)
        if len(groups) == 1:
            sections.append(render(result, "dose.png"))
            results, figures["dose.png"] = result, (result, "")
        else:
            figure = f"dose-{len(figures) + 1}.png"
            sections.append(f"## {label}\n\n" + render(result, figure))
            results[label], figures[figure] = result, (result, label)
    if not sections:
        raise SystemExit(f"error: {root}: no pair with the ceilings, a no-conflict student and another student")
    note = sweep.models_note(short) if len(groups) > 1 else ""
    if left_out:
        sections.append("Run folders left out:\n\n" + "".join(f"- `{f.name}`: {why}\n" for f, why in left_out))
    return "\n".join(([note, ""] if note else []) + sections), results, figures, left_out


OWN_FIGURE = re.compile(r"^!\[dose-response\]\(([^)/]+\.png)\)$", re.M)


def own_files(root):
    """The files an earlier dose.py wrote in `root`: dose.md (its first line is dose.py's command), dose.json, and
    the figures that dose.md shows; empty where no dose.md of dose.py's is there."""
    md = Path(root) / "dose.md"
    text = md.read_text(errors="replace") if md.is_file() else ""
    if not re.match(r"`python (tools/)?dose\.py ", text):
        return set()
    return {"dose.md", "dose.json", *OWN_FIGURE.findall(text)}


def write_outputs(root, body, results, figures):
    """dose.md, dose.json and the figures; an earlier dose.py's figures that this one does not draw are removed.
    A file of the same name that dose.py did not write stops it with one line: nothing of the user's is
    overwritten or removed."""
    own = own_files(root)
    foreign = [n for n in ("dose.md", "dose.json", *figures) if (root / n).exists() and n not in own]
    if foreign:
        raise SystemExit(f"error: {root} holds {', '.join(foreign)}, which dose.py did not write (no dose.md of "
                         "dose.py's shows it); move it away first")
    runs.write_json(root / "dose.json", results)
    for old in own - {"dose.md", "dose.json"} - set(figures):
        (root / old).unlink(missing_ok=True)
    for name, (result, title) in figures.items():
        draw(result, root / name, title)
    text = f"`python tools/dose.py {root}`\n\n" + body
    runs.write_atomic(root / "dose.md", text)
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.strip())
        return
    if len(argv) != 1 or argv[0].startswith("-"):
        raise SystemExit(USAGE)
    root = Path(argv[0])
    if not root.is_dir():
        raise SystemExit(f"error: {root} is not a folder")
    body, results, figures, left_out = document(root)
    for folder, why in left_out:
        print(f"dose.py: left out {folder}: {why}", file=sys.stderr)
    print(write_outputs(root, body, results, figures))


if __name__ == "__main__":
    main()
