"""How fast does the teacher translate, and does the CTranslate2 engine keep its BLEU?

One run, the same sentences, the same thread count, one after the other:
  (a) fairseq-generate (its own timer around generation: model loading and start-up excluded)
  (b) fairseq-kd-distill-data --engine fairseq
  (c) fairseq-kd-distill-data --engine ctranslate2 --ct2-quantization float32
  (d) the same with int16
  (e) the same with int8
The steps run in --repeats interleaved rounds; each rate is the best round's. For (b)-(e) the
rate is distill-data's own "translated N sentences in Xs" line, which starts after
the teacher is loaded (or converted) and includes collation, selection and writing the shards; the
conversion to CTranslate2 is timed separately (fairseq-kd-export-ct2, a whole process). Every
output is detokenized with the sentencepiece model and scored against the gold with sacreBLEU.

    OMP_NUM_THREADS=1 python benchmarks/decode_engines.py \\
        --teacher /work/shared/models/multi30k-en-de-t3x3/teacher.pt \\
        --spm /work/shared/models/multi30k-en-de-t3x3/spm8k.model \\
        --dict /work/shared/models/multi30k-en-de-t3x3/dict.txt --raw-data data/multi30k

Writes benchmarks/results/decode_engines.json and prints a table.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
QUANTIZATIONS = ("float32", "int16", "int8")  # the CTranslate2 teacher's weights, in the order run


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="fairseq teacher checkpoint")
    parser.add_argument("--spm", required=True, help="sentencepiece model the teacher's data was encoded with")
    parser.add_argument("--dict", required=True, help="the teacher's fairseq dictionary (joined: both sides)")
    parser.add_argument("--raw-data", default=os.path.join(REPO, "data", "multi30k"),
                        help="directory with the raw PREFIX.SRC / PREFIX.TGT files")
    parser.add_argument("--prefix", default="test_2016_flickr", help="raw file prefix of the sentences")
    parser.add_argument("--source-lang", default="en")
    parser.add_argument("--target-lang", default="de")
    parser.add_argument("--sentences", type=int, default=1000, help="first N sentences of the file")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every engine (OMP_NUM_THREADS)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch, every engine")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over the four steps, interleaved (a, b, c, d, a, b, ...); the rate is the best "
                        "round's, the least disturbed by other load on a shared machine; every round is recorded")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "decode_engines.json"))
    return parser.parse_args()


def run(cmd, env):
    """Run ``cmd``; its combined output and its wall time in seconds."""
    start = time.time()
    proc = subprocess.run([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}")
    return proc.stdout, wall


def prepare(args, work, env):
    """Encode the first --sentences with the spm model and binarize them with the teacher's dictionary."""
    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(model_file=args.spm)
    gold = {}
    for lang in (args.source_lang, args.target_lang):
        with open(os.path.join(args.raw_data, f"{args.prefix}.{lang}"), encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f][: args.sentences]
        gold[lang] = lines
        with open(os.path.join(work, f"test.{lang}"), "w", encoding="utf-8") as out:
            out.writelines(" ".join(spm.encode(line, out_type=str)) + "\n" for line in lines)
    run([os.path.join(BIN, "fairseq-preprocess"), "-s", args.source_lang, "-t", args.target_lang,
         "--testpref", os.path.join(work, "test"), "--srcdict", args.dict, "--tgtdict", args.dict,
         "--destdir", os.path.join(work, "bin"), "--workers", "1"], env)
    return spm, gold


def bleu(spm, hypotheses, references):
    import sacrebleu

    detok = [spm.decode(h.split()) for h in hypotheses]
    return round(sacrebleu.corpus_bleu(detok, [references]).score, 2)


def fairseq_generate(args, work, env):
    out, wall = run([os.path.join(BIN, "fairseq-generate"), os.path.join(work, "bin"), "--user-dir",
                     os.path.join(REPO, "fairseq_kd"), "--path", args.teacher, "--gen-subset", "test",
                     "--beam", args.beam, "--batch-size", args.batch_size, "--required-batch-size-multiple", "1",
                     "--cpu"], env)
    hyps = dict((int(i), text) for i, text in re.findall(r"^H-(\d+)\t\S+\t(.*)$", out, flags=re.M))
    if sorted(hyps) != list(range(args.sentences)):
        sys.exit(f"fairseq-generate returned {len(hyps)} of {args.sentences} sentences")
    timed = re.search(r"Translated ([\d,]+) sentences \([\d,]+ tokens\) in ([\d.]+)s \(([\d.]+) sentences/s", out)
    return [hyps[i] for i in range(args.sentences)], float(timed.group(2)), wall


def distill_data(args, work, env, name, *engine):
    destdir = os.path.join(work, name)
    if os.path.isdir(destdir):  # an earlier round's output: translate again from scratch
        shutil.rmtree(destdir)
    out, wall = run([os.path.join(BIN, "fairseq-kd-distill-data"), os.path.join(work, "bin"), "--teacher-path",
                     args.teacher, "--split", "test", "--destdir", destdir, "--beam", args.beam, "--batch-size",
                     args.batch_size, "--cpu", "--copy-splits", "", *engine], env)
    timed = re.search(r"translated \d+ shards, (\d+) sentences in ([\d.]+)s", out)
    assert int(timed.group(1)) == args.sentences, out[-2000:]
    with open(os.path.join(destdir, f"test.kd.{args.target_lang}"), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f], float(timed.group(2)), wall


def main():
    args = parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONWARNINGS="ignore")
    rows = []
    with tempfile.TemporaryDirectory(prefix="decode-engines-") as work:
        spm, gold = prepare(args, work, env)
        references = gold[args.target_lang]
        steps = [
            ("fairseq-generate", lambda: fairseq_generate(args, work, env)),
            ("distill-data --engine fairseq", lambda: distill_data(args, work, env, "fairseq", "--engine", "fairseq")),
        ] + [(f"distill-data --engine ctranslate2 {q}",
               lambda q=q: distill_data(args, work, env, f"ct2-{q}", "--engine", "ctranslate2", "--ct2-quantization", q))
             for q in QUANTIZATIONS]
        for round_ in range(args.repeats):
            for k, (name, step) in enumerate(steps):
                load_before = os.getloadavg()[0]
                hypotheses, seconds, wall = step()
                if round_ == 0:
                    rows.append({"engine": name, "sentences": args.sentences, "decode_seconds": [],
                                 "process_wall_seconds": [], "load_average_1min": [],
                                 "bleu": bleu(spm, hypotheses, references), "hypotheses": hypotheses})
                row = rows[k]
                row["same_output_every_round"] = hypotheses == row["hypotheses"]
                row["decode_seconds"].append(round(seconds, 2))
                row["process_wall_seconds"].append(round(wall, 1))
                row["load_average_1min"].append([round(load_before, 2), round(os.getloadavg()[0], 2)])
                print(json.dumps({key: v for key, v in row.items() if key != "hypotheses"}), flush=True)
        for row in rows:
            del row["hypotheses"]
            row["sentences_per_second"] = round(args.sentences / min(row["decode_seconds"]), 1)
        conversions = {}
        for quantization in QUANTIZATIONS:
            _, wall = run([os.path.join(BIN, "fairseq-kd-export-ct2"), args.teacher, os.path.join(work, "bin"),
                           "--quantization", quantization, "--output-dir", os.path.join(work, f"export-{quantization}")],
                          env)
            conversions[quantization] = round(wall, 1)

    base = rows[0]["sentences_per_second"]
    for row in rows:
        row["speed_vs_fairseq_generate"] = round(row["sentences_per_second"] / base, 2)
        row["bleu_vs_fairseq_generate"] = round(row["bleu"] - rows[0]["bleu"], 2)
    import ctranslate2
    import torch

    result = {
        "command": " ".join(sys.argv),
        "teacher": os.path.abspath(args.teacher),
        "data": f"{args.raw_data}/{args.prefix}.{args.source_lang}-{args.target_lang}, first {args.sentences}",
        "threads": args.threads, "beam": args.beam, "batch_size": args.batch_size, "repeats": args.repeats,
        "rows": rows,
        "conversion_process_wall_seconds": conversions,
        "targets": {
            "engine_fairseq_within_5pct_of_generate": abs(rows[1]["speed_vs_fairseq_generate"] - 1) <= 0.05,
            **{f"ctranslate2_{q}_2x_at_bleu_0.2": row["speed_vs_fairseq_generate"] >= 2
               and abs(row["bleu_vs_fairseq_generate"]) <= 0.2 for q, row in zip(QUANTIZATIONS, rows[2:])},
        },
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "ctranslate2": ctranslate2.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)

    print(f"\n{'engine':45} {'sent/s':>7} {'x generate':>10} {'BLEU':>6}  decode s (rounds)  load average")
    for r in rows:
        print(f"{r['engine']:45} {r['sentences_per_second']:7.1f} {r['speed_vs_fairseq_generate']:10.2f} "
              f"{r['bleu']:6.2f}  {r['decode_seconds']}  {r['load_average_1min']}")
    print(f"conversion (fairseq-kd-export-ct2, whole process): {conversions}")
    print(f"targets: {result['targets']}\nwrote {args.out}")


if __name__ == "__main__":
    main()
