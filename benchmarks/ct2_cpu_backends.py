"""Does a CTranslate2 int8 model translate the same on every CPU?

CTranslate2 chooses its CPU matrix-product backend when it starts: Intel MKL on Intel CPUs, oneDNN
on others (AMD among them); ``CT2_USE_MKL=1`` makes it use MKL on any x86 CPU. The two compute int8
products differently, and only MKL has int16 (elsewhere an int16 model runs as int8). This benchmark
exports one model (fairseq-kd-export-ct2's conversion) in float32, int16 and int8, then, in a fresh
process per backend (the one CTranslate2 picks on this CPU, and MKL forced), translates the test
sets with each export (beam 5, batches of 64, one thread, as the recipes' speed step) and records
the compute type it ran in, the backend CTranslate2 logged, sacreBLEU on each test set, the
translations identical to the float32 export's under the same backend, and sentences/s (the best of
--repeats rounds).

    python benchmarks/ct2_cpu_backends.py --teacher /work/shared/models/multi30k-en-de-t3x3/teacher.pt \\
        --spm /work/shared/models/multi30k-en-de-t3x3/spm8k.model \\
        --dict /work/shared/models/multi30k-en-de-t3x3/dict.txt

Writes benchmarks/results/ct2_cpu_backends.json and prints a table.
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
sys.path.insert(0, os.path.join(REPO, "examples", "tools"))
BACKENDS = {"cpu's own": {}, "mkl forced": {"CT2_USE_MKL": "1"}}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="fairseq checkpoint to export")
    parser.add_argument("--spm", required=True, help="sentencepiece model the model's data was encoded with")
    parser.add_argument("--dict", required=True, help="the model's fairseq dictionary (joined: both sides)")
    parser.add_argument("--raw-data", default=os.path.join(REPO, "data", "multi30k"),
                        help="directory with the raw TEST.SRC / TEST.TGT files")
    parser.add_argument("--tests", nargs="+", default=["test_2016_flickr", "test_2017_flickr"])
    parser.add_argument("--source-lang", default="en")
    parser.add_argument("--target-lang", default="de")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per export; the best is kept")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "ct2_cpu_backends.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the exports' directory: translate, print JSON
    return parser.parse_args()


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def translate_all(args):
    """In this process's backend: per export, its compute type, and per test set its translations
    and the best round's seconds."""
    import sentencepiece

    from fairseq_kd.ct2_export import QUANTIZATIONS
    from fairseq_kd.ct2_translate import DecodingSettings, load_translator, translate_pieces

    spm = sentencepiece.SentencePieceProcessor(model_file=args.spm)
    settings = DecodingSettings(beam=args.beam)
    test_sources = {test: [spm.encode(line, out_type=str)
                           for line in read_lines(os.path.join(args.raw_data, f"{test}.{args.source_lang}"))]
                    for test in args.tests}
    results = {}
    for quantization in QUANTIZATIONS:
        translator = load_translator(os.path.join(args.worker, quantization), threads=1)
        result = results[quantization] = {"compute_type": translator.compute_type, "tests": {}}
        for test, sources in test_sources.items():
            seconds = []
            for _ in range(args.repeats):
                start, outputs = time.perf_counter(), []
                for i in range(0, len(sources), args.batch_size):
                    outputs += [nbest[0][0] for nbest in translate_pieces(translator, sources[i:i + args.batch_size],
                                                                          settings)]
                seconds.append(time.perf_counter() - start)
            result["tests"][test] = {"translations": [spm.decode(o) for o in outputs], "seconds": min(seconds)}
    print(json.dumps(results))


def run_backend(args, exports, env_extra):
    """This script as a worker in a fresh process with ``env_extra``: its results and the backend lines
    CTranslate2 logged."""
    env = {name: value for name, value in os.environ.items() if name != "CT2_USE_MKL"}
    env.update(CT2_VERBOSE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **env_extra)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", exports], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    logged = re.findall(r"\[info\]\s+(?:- )?((?:CPU|Selected ISA|SGEMM backend|GEMM_S8 backend|GEMM_S16 backend): .*)$",
                        proc.stderr, flags=re.M)
    return json.loads(proc.stdout.strip().splitlines()[-1]), list(dict.fromkeys(logged))


def measure(args):
    """Export the model in every type, translate with each backend; one row per backend and export."""
    import sacrebleu

    from fairseq_kd.ct2_export import QUANTIZATIONS, export

    references = {t: read_lines(os.path.join(args.raw_data, f"{t}.{args.target_lang}")) for t in args.tests}
    rows = []
    work = tempfile.mkdtemp(prefix="ct2-cpu-backends-")
    try:
        data = os.path.join(work, "data")
        os.makedirs(data)
        for lang in (args.source_lang, args.target_lang):
            shutil.copy(args.dict, os.path.join(data, f"dict.{lang}.txt"))
        for quantization in QUANTIZATIONS:
            export(args.teacher, data, os.path.join(work, quantization), quantization, args.source_lang,
                   args.target_lang, dict_dir=data)
        for backend, env_extra in BACKENDS.items():
            results, logged = run_backend(args, work, env_extra)
            for quantization in QUANTIZATIONS:
                result = results[quantization]
                row = {"backend": backend, "ctranslate2_log": logged, "export": quantization,
                       "compute_type": result["compute_type"], "tests": {}}
                for test, out in result["tests"].items():
                    float32 = results["float32"]["tests"][test]["translations"]
                    row["tests"][test] = {
                        "bleu": round(sacrebleu.corpus_bleu(out["translations"], [references[test]]).score, 2),
                        "identical_to_float32": sum(a == b for a, b in zip(out["translations"], float32)),
                        "sentences": len(float32),
                        "sentences_per_second": round(len(float32) / out["seconds"], 1),
                    }
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work)
    return rows


def report(args, rows):
    """Write the JSON record and print the table."""
    import ctranslate2
    import torch

    from speed import device_name

    result = {
        "command": " ".join(sys.argv), "teacher": os.path.abspath(args.teacher), "beam": args.beam,
        "batch_size": args.batch_size, "threads": 1, "repeats": args.repeats, "rows": rows,
        "machine": {"platform": platform.platform(), "processor": device_name(torch.device("cpu")), "cpus": os.cpu_count(),
                    "ctranslate2": ctranslate2.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(args.out + ".tmp", args.out)

    print(f"\n{result['machine']['processor']}; CTranslate2 {ctranslate2.__version__}, 1 thread, beam {args.beam}")
    print(f"{'backend':11} {'export':8} {'runs as':13} " + "  ".join(f"{t:>38}" for t in args.tests))
    print(" " * 34 + "  ".join(f"{'BLEU':>8} {'same as float32':>16} {'sent/s':>11}" for _ in args.tests))
    for row in rows:
        cells = "  ".join(f"{v['bleu']:8.2f} {v['identical_to_float32']:>9}/{v['sentences']:<6} "
                          f"{v['sentences_per_second']:11.1f}" for v in row["tests"].values())
        print(f"{row['backend']:11} {row['export']:8} {row['compute_type']:13} {cells}")
    for backend in BACKENDS:
        print(f"{backend}: {next(r['ctranslate2_log'] for r in rows if r['backend'] == backend)}")
    print(f"wrote {args.out}")


def main():
    args = parse_args()
    if args.worker:
        translate_all(args)
    else:
        report(args, measure(args))


if __name__ == "__main__":
    main()
