"""Does a student distilled from a top-k teacher cache match one distilled from the full online
teacher? Same data, student, seed and number of updates; only the teacher's form differs.

Steps (each skipped when its output exists, so an interrupted run continues):
  1. encode data/multi30k en-de with the teacher's sentencepiece model, binarize with its dictionary
  2. cache the teacher's top-k on train and valid (fairseq-kd-cache-teacher)
  3. train the student with word_kd from the online teacher, and from the cache
  4. translate test_2016_flickr with both (beam 5), detokenize, score with sacreBLEU

    python benchmarks/cache_quality.py --teacher-dir ../shared/models/multi30k-en-de-t3x3 \
        --work work/cache-quality --out benchmarks/results/cache_quality.json

The teacher directory holds teacher.pt, spm8k.model and dict.txt (the shared 7.6M-parameter
Multi30k en-de teacher, see its README).
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
STUDENT = [
    "--arch", "transformer", "--share-all-embeddings", "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "128", "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", "512",
    "--decoder-ffn-embed-dim", "512", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    "--dropout", "0.1", "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "1e-3",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "400", "--max-tokens", "4096", "--cpu",
    "--required-batch-size-multiple", "1", "--no-progress-bar", "--log-format", "simple", "--log-interval", "50",
    "--no-epoch-checkpoints", "--num-workers", "0",
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-dir", required=True, help="directory with teacher.pt, spm8k.model, dict.txt")
    parser.add_argument("--data", default=os.path.join(REPO, "data", "multi30k"), help="raw Multi30k files")
    parser.add_argument("--work", default=os.path.join(REPO, "work", "cache-quality"), help="working directory")
    parser.add_argument("--updates", type=int, default=1500, help="student updates, both runs")
    parser.add_argument("--k", type=int, default=8, help="cached entries per token")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of every step (OMP_NUM_THREADS)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "cache_quality.json"))
    return parser.parse_args()


def run(cmd, log):
    with open(log, "a") as f:
        subprocess.run([str(c) for c in cmd], check=True, stdout=f, stderr=subprocess.STDOUT)


def done(path, make):
    """Run ``make(tmp)`` unless ``path`` exists; ``make`` writes ``tmp``, renamed to ``path``."""
    if os.path.exists(path):
        return
    tmp = path + ".partial"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    make(tmp)
    os.replace(tmp, path)


def encode(args, bin_dir, log):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.teacher_dir, "spm8k.model"))
    text = bin_dir + ".text"
    os.makedirs(text, exist_ok=True)
    for split, name in (("train", "train"), ("valid", "val"), ("test", "test_2016_flickr")):
        for lang in ("en", "de"):
            with open(os.path.join(args.data, f"{name}.{lang}"), encoding="utf-8") as f, \
                    open(os.path.join(text, f"{split}.{lang}"), "w", encoding="utf-8") as out:
                out.writelines(" ".join(sp.encode(line.rstrip("\n"), out_type=str)) + "\n" for line in f)
    d = os.path.join(args.teacher_dir, "dict.txt")
    run([f"{BIN}/fairseq-preprocess", "-s", "en", "-t", "de", "--trainpref", f"{text}/train",
         "--validpref", f"{text}/valid", "--testpref", f"{text}/test", "--destdir", bin_dir + ".partial",
         "--srcdict", d, "--tgtdict", d, "--workers", "2"], log)


def training_state(checkpoint):
    """(updates done, fairseq's own count of the training seconds over every run that resumed it)."""
    from fairseq import checkpoint_utils

    import fairseq_kd  # noqa: F401  (safe loading of fairseq checkpoints)

    state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
    return state["optimizer_history"][-1]["num_updates"], state["extra_state"]["previous_training_time"]


def train(args, bin_dir, save_dir, teacher_flags, log):
    """Train (or finish training) one student; its training seconds. A finished student is not
    handed to fairseq-train again, which would take one more update before it stops."""
    last = os.path.join(save_dir, "checkpoint_last.pt")
    if os.path.exists(last):
        updates, seconds = training_state(last)
        if updates >= args.updates:
            return seconds
    cmd = [f"{BIN}/fairseq-train", bin_dir, "--user-dir", os.path.join(REPO, "fairseq_kd"),
           "--task", "translation_distill", "--criterion", "word_kd", "--alpha", "0.5", "--temperature", "1",
           *teacher_flags, *STUDENT, "--seed", str(args.seed), "--max-update", str(args.updates),
           "--save-dir", save_dir]
    run(cmd, log)  # resumes from save_dir/checkpoint_last.pt when interrupted
    return training_state(last)[1]


def bleu(args, bin_dir, checkpoint, log):
    """sacreBLEU of ``checkpoint`` on test_2016_flickr (beam 5), detokenized with the spm model."""
    import sacrebleu
    import sentencepiece as spm

    out = subprocess.run(
        [f"{BIN}/fairseq-generate", bin_dir, "--user-dir", os.path.join(REPO, "fairseq_kd"), "--path", checkpoint,
         "--gen-subset", "test", "--beam", "5", "--batch-size", "128", "--required-batch-size-multiple", "1",
         "--cpu"], check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    hyps = {int(i): h for i, h in re.findall(r"^H-(\d+)\t\S+\t(.*)$", out, flags=re.M)}
    with open(os.path.join(args.data, "test_2016_flickr.de"), encoding="utf-8") as f:
        refs = [line.rstrip("\n") for line in f]
    if sorted(hyps) != list(range(len(refs))):
        raise RuntimeError(f"fairseq-generate returned {len(hyps)} hypotheses for {len(refs)} sentences")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.teacher_dir, "spm8k.model"))
    detok = [sp.decode(hyps[i].split()) for i in range(len(refs))]
    metric = sacrebleu.metrics.BLEU()
    return metric.corpus_score(detok, [refs]).score, str(metric.get_signature()), detok


def main():
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.makedirs(args.work, exist_ok=True)
    log = os.path.join(args.work, "log.txt")
    bin_dir = os.path.join(args.work, "bin")
    teacher = os.path.join(args.teacher_dir, "teacher.pt")
    done(bin_dir, lambda tmp: encode(args, bin_dir, log))
    cache = os.path.join(args.work, f"cache-top{args.k}")
    for split in ("train", "valid"):  # the cache tool itself resumes, and does nothing when complete
        run([f"{BIN}/fairseq-kd-cache-teacher", "--teacher-path", teacher, "--teacher-dict-dir", args.teacher_dir,
             bin_dir, "--split", split, "--k", str(args.k), "--destdir", os.path.join(cache, split), "--cpu",
             "--teacher-precision", "fp32"], log)
    results, translations = {}, {}
    for name, flags in (
        ("online", ["--teacher-path", teacher, "--teacher-dict-dir", args.teacher_dir, "--teacher-precision", "fp32"]),
        (f"cached_top{args.k}", ["--teacher-cache", cache]),
    ):
        save_dir = os.path.join(args.work, name)
        seconds = train(args, bin_dir, save_dir, flags, log)
        score, signature, translations[name] = bleu(args, bin_dir, os.path.join(save_dir, "checkpoint_last.pt"), log)
        results[name] = {"bleu": round(score, 3), "train_seconds": round(seconds), "signature": signature}
        print(f"{name:14s} BLEU {score:.3f}", flush=True)
    summary = {
        "what": "word_kd student (2+2 layers, d=128) from the online teacher vs from its top-k cache; "
                "test_2016_flickr, beam 5, last checkpoint",
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "threads": args.threads, "python": platform.python_version()},
        "settings": vars(args), "results": results,
        "bleu_difference_cached_minus_online": round(results[f"cached_top{args.k}"]["bleu"] - results["online"]["bleu"], 3),
        "translations_that_differ": sum(a != b for a, b in zip(translations["online"], translations[f"cached_top{args.k}"])),
        "sentences": len(translations["online"]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary["results"], indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
