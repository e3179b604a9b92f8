"""A recipe's results: BLEU of the teacher and every student on every test set, with sacreBLEU's
signature; mean and spread over seeds; a paired bootstrap test of each method against its baseline;
parameters, compression and decoding speed. Writes OUT.md (a markdown table), OUT.png (BLEU against
parameters; with --plot-by-method, also against int8 decoding speed, one line per method) and a
JSON file with every number.

    python report.py --title TITLE --models models.tsv --tests NAME... \
        --references RAW_DIR --tgt de --speed speed.json --scale full \
        --out docs/results/multi30k-en-de --json WORK/results.json

Each model's hypotheses are DIR/NAME.hyp (detokenized, one per reference line) and its weights
DIR/checkpoint_best.pt; the references are RAW_DIR/NAME.TGT, raw text as distributed.
"""

import argparse
import csv
import json
import os
import statistics
import sys
import time
from collections import OrderedDict

import torch
from sacrebleu.metrics import BLEU
from sacrebleu.significance import PairedTest

import fairseq_kd  # noqa: F401  (lets torch.load read fairseq checkpoints safely)

BOOTSTRAP_SAMPLES = 1000


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def count_parameters(checkpoint):
    """Parameters of the model in a fairseq checkpoint, each tied tensor counted once (shared
    embeddings appear under three names), version counters and positional buffers left out."""
    state = torch.load(checkpoint, map_location="cpu")["model"]
    seen, total = set(), 0
    for name, tensor in state.items():
        if name.endswith((".version", "_float_tensor")) or not tensor.is_floating_point():
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


def read_models(path):
    """Groups in models.tsv order:
    {group: {"label", "role", "baseline" (a group, or None), "runs": [{"name", "seed", "dir"}]}}."""
    groups = OrderedDict()
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            group = groups.setdefault(row["group"], {
                "label": row["label"], "role": row["role"], "runs": [],
                "baseline": None if row["baseline"] == "-" else row["baseline"],
            })
            group["runs"].append({"name": row["name"], "seed": int(row["seed"]), "dir": row["dir"]})
    unknown = sorted({g["baseline"] for g in groups.values() if g["baseline"] and g["baseline"] not in groups})
    if unknown:
        sys.exit(f"{path}: baselines that are no model group: {', '.join(unknown)}")
    return groups


def score_test(groups, test, references):
    """BLEU of every run on one test set, and the paired bootstrap p-value of each group's first run
    against its baseline's first run. Returns (signature, bootstrap signature)."""
    metric = BLEU()
    hypotheses = {}
    for group in groups.values():
        for run in group["runs"]:
            path = os.path.join(run["dir"], f"{test}.hyp")
            lines = read_lines(path)
            if len(lines) != len(references):
                sys.exit(f"{path}: {len(lines)} hypotheses for {len(references)} references")
            hypotheses[run["name"]] = lines
            run.setdefault("bleu", {})[test] = metric.corpus_score(lines, [references]).score
    signature = str(metric.get_signature())

    # sacreBLEU's paired bootstrap resampling (Koehn 2004), once per baseline: its first system is
    # the baseline, the others are the groups tested against it (each group's first seed)
    bootstrap_signature = None
    for baseline in dict.fromkeys(g["baseline"] for g in groups.values() if g["baseline"]):
        tested = [g for name, g in groups.items() if g["baseline"] == baseline and name != baseline]
        if not tested:
            continue
        systems = [groups[baseline]["runs"][0]["name"]] + [g["runs"][0]["name"] for g in tested]
        signatures, results = PairedTest(
            [(name, hypotheses[name]) for name in systems], {"BLEU": BLEU()}, [references],
            test_type="bs", n_samples=BOOTSTRAP_SAMPLES,
        )()
        bootstrap_signature = str(signatures["BLEU"])
        for group, result in zip(tested, results["BLEU"][1:], strict=True):
            group.setdefault("p_value", {})[test] = result.p_value
    return signature, bootstrap_signature


def summarise(groups, tests, speed):
    teacher = next(g for g in groups.values() if g["role"] == "teacher")
    for group in groups.values():
        group["parameters"] = count_parameters(os.path.join(group["runs"][0]["dir"], "checkpoint_best.pt"))
        group["bleu"] = {}
        for test in tests:
            scores = [run["bleu"][test] for run in group["runs"]]
            std = statistics.stdev(scores) if len(scores) > 1 else None
            group["bleu"][test] = {"mean": statistics.mean(scores), "std": std, "seeds": scores}
        group["speed"] = speed["sentences_per_second"].get(group["runs"][0]["name"], {})
        ct2 = speed.get("ct2", {})
        group["ct2_speed"] = ct2.get("sentences_per_second", {}).get(group["runs"][0]["name"], {})
        group["ct2_bleu"] = ct2.get("bleu", {}).get(group["runs"][0]["name"], {})
    for name, group in groups.items():
        group["compression"] = round(teacher["parameters"] / group["parameters"], 2)
        if group["baseline"] not in (None, name):
            baseline = groups[group["baseline"]]
            group["gap_closed"] = {test: gap_closed(teacher["bleu"][test]["mean"], baseline["bleu"][test]["mean"],
                                                    group["bleu"][test]["mean"]) for test in tests}


def gap_closed(teacher, baseline, student):
    """The share of the teacher's lead over the baseline student that a method recovers:
    (student - baseline) / (teacher - baseline); None when the baseline is not below the teacher."""
    return (student - baseline) / (teacher - baseline) if teacher > baseline else None


def bleu_cell(bleu):
    return f"{bleu['mean']:.2f}" + (f" ± {bleu['std']:.2f}" if bleu["std"] is not None else "")


def p_cell(name, group, groups, test):
    """The bootstrap p-value against the baseline, "baseline" for a baseline itself. sacreBLEU gives
    an identical score p = 1/(samples + 1), as if the difference were significant: shown as "="."""
    if group["baseline"] is None:
        return ""
    if group["baseline"] == name:
        return "baseline"
    if group["runs"][0]["bleu"][test] == groups[group["baseline"]]["runs"][0]["bleu"][test]:
        return "="
    p = group["p_value"][test]
    return f"{p:.3f}" + (" *" if p < 0.05 else "")


def gap_cell(group, test):
    share = group.get("gap_closed", {}).get(test)
    return "" if share is None else f"{100 * share:.0f}%"


def speed_cell(speeds, batch_size):
    return f"{speeds[batch_size]:.1f}" if batch_size in speeds else "n/a"


def speed_up_cell(speeds, teacher_speeds, batch_size):
    if batch_size not in speeds or batch_size not in teacher_speeds:
        return "n/a"
    return f"{speeds[batch_size] / teacher_speeds[batch_size]:.1f}x"


def markdown(args, groups, tests, speed, signature, bootstrap_signature):
    seeds = sorted({run["seed"] for g in groups.values() if g["role"] == "student" for run in g["runs"]})
    batch_sizes = [str(b) for b in speed["batch_sizes"]]
    ct2 = speed.get("ct2")
    teacher = next(g for g in groups.values() if g["role"] == "teacher")
    header = ["model", "method", "parameters", "compression"]
    for test in tests:
        header += [f"BLEU {test}", "p", "gap closed"]
    header += [f"sent/s, batch {b}" for b in batch_sizes]
    if ct2:
        header += [f"{ct2['quantization']} BLEU {test}" for test in tests]
        header += [f"{ct2['quantization']} sent/s, batch {b}" for b in batch_sizes]
        header += [f"{ct2['quantization']} speed-up, batch {batch_sizes[0]}"]
    rows = []
    for name, group in groups.items():
        row = [name, group["label"], f"{group['parameters']:,}", f"{group['compression']:.2f}x"]
        for test in tests:
            row += [bleu_cell(group["bleu"][test]), p_cell(name, group, groups, test), gap_cell(group, test)]
        row += [speed_cell(group["speed"], b) for b in batch_sizes]
        if ct2:
            row += [f"{group['ct2_bleu'][test]:.2f}" if test in group["ct2_bleu"] else "n/a" for test in tests]
            row += [speed_cell(group["ct2_speed"], b) for b in batch_sizes]
            row += [speed_up_cell(group["ct2_speed"], teacher["speed"], batch_sizes[0])]
        rows.append(row)
    lines = [
        f"# {args.title}",
        "",
        f"Written by the recipe on {time.strftime('%Y-%m-%d')}; do not edit by hand.",
        "",
    ]
    if args.settings:
        lines += [f"Settings (set them in the environment of the recipe to rerun it): `{args.settings}`", ""]
    lines += [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    spread = (f"mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}; "
              if len(seeds) > 1 else f"seed {seeds[0]}; ")
    lines += [
        "",
        f"- BLEU: detokenized output against the raw references, {spread}beam {speed['beam']}. "
        f"sacreBLEU signature: `{signature}`",
        f"- p: paired bootstrap resampling of the first seed against the first seed of its baseline "
        f"(sacreBLEU, `{bootstrap_signature}`); * marks p < 0.05, = the same score.",
        "- compression: the teacher's parameters divided by the model's (tied embeddings counted once).",
        f"- decoding speed: sentences per second of fairseq's beam search (generation calls only, after a "
        f"warm-up batch) over the first {speed['sentences']} sentences of {tests[0]}, beam {speed['beam']}, "
        f"on {speed['device']} with {speed['threads']} threads; every model measured in the same run, "
        + ("one after the other." if speed.get("rounds", 1) == 1 else
           f"{speed['rounds']} times in turn (round-robin), each speed the median of a model's rounds."),
        "- gap closed: (BLEU - baseline's BLEU) / (teacher's BLEU - baseline's BLEU), the share of the teacher's "
        "lead over the baseline student that the method recovers.",
    ]
    if ct2:
        q = ct2["quantization"]
        lines += [
            f"- {q}: the model exported to CTranslate2 {ct2['version']} in {q} (fairseq-kd-export-ct2), beam "
            f"{speed['beam']}, the same batches and threads as fairseq; its BLEU on every test set "
            f"(`{ct2['signature']}`); speed-up: its sentences/s at batch {batch_sizes[0]} divided by the "
            f"teacher's in fairseq.",
        ]
    if ct2 and args.plot_by_method:
        teacher_speed = teacher["speed"].get(batch_sizes[0])
        cells = []
        for size, speeds in speed_by_size(groups, batch_sizes[0]).items():
            median = statistics.median(speeds)
            speed_up = f", {median / teacher_speed:.1f}x" if teacher_speed else ""
            cells.append(f"{size} {median:.1f} ({min(speeds):.1f}-{max(speeds):.1f}{speed_up})")
        lines.append(
            f"- {q} speed by size, batch {batch_sizes[0]}: the methods of a size share its architecture, so the "
            "spread of their speeds is the measurement's (and their output lengths'); the median of its students "
            f"(their range, and the median's speed-up against the teacher in fairseq): {'; '.join(cells)}."
        )
    if any(not group["speed"] for group in groups.values()):
        lines.append("- n/a: a model added after the speed step ran; delete WORK/speed.json to measure all again.")
    return "\n".join(lines) + "\n"


def label_heights(values, gap):
    """Heights for the labels of points that share an x position: each label at its point's value,
    pushed up just enough to stay ``gap`` above the label below it. ``values`` in any order; the
    heights are returned in the same order."""
    heights = [0.0] * len(values)
    below = None
    for i in sorted(range(len(values)), key=lambda i: values[i]):
        heights[i] = values[i] if below is None else max(values[i], below + gap)
        below = heights[i]
    return heights


def plot(args, groups, tests, path):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    test = tests[0]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    means = {name: group["bleu"][test]["mean"] for name, group in groups.items()}
    gap = 0.04 * max(max(means.values()) - min(means.values()), 1.0)  # about one label's height
    same_x = {}  # parameters -> the models of that size, whose points share an x position
    for name, group in groups.items():
        same_x.setdefault(group["parameters"], []).append(name)
    label_y = {}
    for names in same_x.values():
        label_y.update(zip(names, label_heights([means[name] for name in names], gap)))
    for name, group in groups.items():
        bleu = group["bleu"][test]
        teacher = group["role"] == "teacher"
        axes.errorbar(
            group["parameters"], bleu["mean"], yerr=bleu["std"] or 0, fmt="*" if teacher else "o",
            markersize=12 if teacher else 6, color="black" if teacher else None, capsize=3,
        )
        axes.annotate(name, (group["parameters"], bleu["mean"]), xytext=(8, label_y[name]),
                      textcoords=("offset points", "data"), va="center", fontsize=7)
    axes.set_xscale("log")
    axes.set_xlabel("parameters")
    axes.set_ylabel(f"BLEU, {test}")
    axes.set_title(args.title, fontsize=10)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")
    plt.close(figure)


def size_and_method(name):
    """(size, method) of a student group named SIZE.METHOD, e.g. 4x_deep_enc.hybrid_kd."""
    size, dot, method = name.partition(".")
    if not dot or not size or not method:
        sys.exit(f"--plot-by-method: the student group {name!r} is not named SIZE.METHOD")
    return size, method


def speed_by_size(groups, batch):
    """{size: the CTranslate2 sentences/s at ``batch`` of each of its students}, for student groups
    named SIZE.METHOD, in the groups' order."""
    sizes = OrderedDict()
    for name, group in groups.items():
        if group["role"] != "teacher" and batch in group["ct2_speed"]:
            sizes.setdefault(size_and_method(name)[0], []).append(group["ct2_speed"][batch])
    return sizes


def plot_by_method(args, groups, tests, path):
    """BLEU on the first test set against parameters (left) and against int8 sentences/s at the
    first speed batch size (right: each size at the median speed of its students, which share its
    architecture), the teacher a star. A size is named RATIO or RATIO_SHAPE (4x, 10x, 4x_deep_enc):
    one line per method through the sizes of one shape, each method one colour, each shape one
    marker and line style."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    test = tests[0]
    batch = min((int(b) for group in groups.values() for b in group["ct2_speed"]), default=1)
    size_speed = {size: statistics.median(speeds) for size, speeds in speed_by_size(groups, str(batch)).items()}
    lines = OrderedDict()  # (method, shape) -> [(parameters, int8 sent/s or None, BLEU)]
    teacher = None
    for name, group in groups.items():
        bleu = group["bleu"][test]["mean"]
        if group["role"] == "teacher":
            teacher = (group["parameters"], group["ct2_speed"].get(str(batch)), bleu)
            continue
        size, method = size_and_method(name)
        point = (group["parameters"], size_speed.get(size), bleu)
        lines.setdefault((method, size.partition("_")[2]), []).append(point)
    # each method one colour, each shape one marker and line style, in order of appearance
    methods = list(dict.fromkeys(method for method, _ in lines))
    shapes = list(dict.fromkeys(shape for _, shape in lines))
    markers, styles = "os^Dv", ["-", "--", ":", "-."]
    figure, panels = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    speed_label = f"int8 sentences/s, batch {batch} (students: their size's median)"
    for column, (axes, label) in enumerate(zip(panels, ("parameters", speed_label))):
        for (method, shape), points in lines.items():
            drawn = sorted((p[column], p[2]) for p in points if p[column] is not None)
            k = shapes.index(shape)
            if drawn:
                axes.plot([x for x, _ in drawn], [y for _, y in drawn], color=f"C{methods.index(method) % 10}",
                          marker=markers[k % len(markers)], linestyle=styles[k % len(styles)],
                          label=f"{method}, {shape}" if shape else method)
        if teacher and teacher[column] is not None:
            axes.plot(teacher[column], teacher[2], "*", color="black", markersize=12, label="teacher")
        axes.set_xscale("log")
        axes.set_xlabel(label)
        axes.grid(True, alpha=0.3)
    panels[0].set_ylabel(f"BLEU, {test}")
    panels[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the points, not on them
    figure.suptitle(args.title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--title", required=True)
    parser.add_argument("--models", required=True, help="models.tsv written by recipe_lib.sh")
    parser.add_argument("--tests", nargs="+", required=True, help="test set names")
    parser.add_argument("--references", required=True, help="directory with NAME.TGT reference files")
    parser.add_argument("--tgt", required=True, help="target language")
    parser.add_argument("--speed", required=True, help="speed.json written by speed.py")
    parser.add_argument("--scale", required=True)
    parser.add_argument("--settings", default="",
                        help="the NAME=VALUE settings the recipe ran with, quoted so that a reader can rerun it")
    parser.add_argument("--out", required=True, help="OUT.md and OUT.png are written")
    parser.add_argument("--json", required=True, help="every number, for scripts and tests")
    parser.add_argument("--plot-by-method", action="store_true",
                        help="student groups are named SIZE.METHOD: plot BLEU against parameters and against "
                             "int8 speed, one line per method")
    args = parser.parse_args()

    groups = read_models(args.models)
    with open(args.speed, encoding="utf-8") as f:
        speed = json.load(f)
    signatures = {}
    for test in args.tests:
        references = read_lines(os.path.join(args.references, f"{test}.{args.tgt}"))
        signatures[test] = score_test(groups, test, references)
    summarise(groups, args.tests, speed)
    signature, bootstrap_signature = signatures[args.tests[0]]

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    table = markdown(args, groups, args.tests, speed, signature, bootstrap_signature)
    with open(f"{args.out}.md.partial", "w", encoding="utf-8") as f:
        f.write(table)
    os.replace(f"{args.out}.md.partial", f"{args.out}.md")
    (plot_by_method if args.plot_by_method else plot)(args, groups, args.tests, f"{args.out}.png.partial")
    os.replace(f"{args.out}.png.partial", f"{args.out}.png")
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"title": args.title, "scale": args.scale, "signature": signature,
                   "bootstrap_signature": bootstrap_signature, "speed": speed, "models": groups}, f, indent=1)
    print(f"wrote {args.out}.md, {args.out}.png and {args.json}")


if __name__ == "__main__":
    main()
