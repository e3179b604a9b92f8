"""Text steps of the recipes: gather a corpus, train and apply sentencepiece, and read translations
back from fairseq-generate.

    python text.py prepare --src en --tgt de --out RAW --train PREFIX --valid PREFIX \
        --test NAME=PREFIX [--test ...] [--train-lines N] [--eval-lines N] --speed-lines N
    python text.py spm-train --vocab-size 8000 --model-prefix DIR/spm FILE...
    python text.py encode --model spm.model --src en --tgt de --raw-dir RAW --out-dir TOK \
        --splits train,valid,... [--max-train-pieces 250]
    python text.py hypotheses --model spm.model --reference REF --generate GEN_OUTPUT --out HYP

Every file is UTF-8, one sentence per line; a corpus PREFIX names PREFIX.SRC and PREFIX.TGT.
"""

import argparse
import itertools
import os
import re
import sys

import sentencepiece as spm

ENCODE_CHUNK = 10000  # lines encoded per call: bounded memory on corpora of millions of lines
SPM_TRAINING_THREADS = 2  # the machine the published results were measured on: see spm_train


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def prepare(args):
    """RAW/{train,valid,NAME...,speed}.{src,tgt}: the corpus files, or their first lines.

    Whole files are linked, not copied (a WMT training corpus is gigabytes). The speed split is
    the first --speed-lines sentences of the first test set, for measuring decoding speed."""
    tests = [t.split("=", 1) for t in args.test]
    splits = [("train", args.train, args.train_lines), ("valid", args.valid, args.eval_lines)]
    splits += [(name, prefix, args.eval_lines) for name, prefix in tests]
    missing = [f"{prefix}.{lang}" for _, prefix, _ in splits for lang in (args.src, args.tgt)
               if not os.path.isfile(f"{prefix}.{lang}")]
    if missing:
        sys.exit("missing corpus files:\n  " + "\n  ".join(missing))
    os.makedirs(args.out, exist_ok=True)
    for name, prefix, limit in splits + [("speed", tests[0][1], args.speed_lines)]:
        counts = {lang: count_lines(f"{prefix}.{lang}") for lang in (args.src, args.tgt)}
        if counts[args.src] != counts[args.tgt]:
            sys.exit(f"{prefix}: {counts[args.src]} {args.src} lines but {counts[args.tgt]} {args.tgt} lines")
        for lang in (args.src, args.tgt):
            source, target = os.path.abspath(f"{prefix}.{lang}"), os.path.join(args.out, f"{name}.{lang}")
            if limit is None:
                if os.path.lexists(target):  # left by an interrupted run
                    os.remove(target)
                os.symlink(source, target)
            else:
                with open(source, encoding="utf-8") as f:
                    write_lines(target, [line.rstrip("\n") for line in itertools.islice(f, limit)])
        kept = counts[args.src] if limit is None else min(limit, counts[args.src])
        print(f"{name}: {kept} of {counts[args.src]} sentence pairs from {prefix}")


def spm_train(args):
    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    # One unigram model over both languages: source and target share one vocabulary (fairseq-preprocess
    # --joined-dictionary, --share-all-embeddings). The vocabulary size is a bound, not a demand, so
    # that a tiny slice of a corpus can train a model at all.
    spm.SentencePieceTrainer.train(
        input=",".join(args.files),
        model_prefix=args.model_prefix,
        vocab_size=args.vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        input_sentence_size=args.input_sentences,
        shuffle_input_sentence=args.input_sentences > 0,
        # the model depends on the number of threads (one and two threads gave different pieces for
        # 3,928 of 4,000 ids on Multi30k en-de; repeated runs with the same number, the same pieces):
        # fixed, so that every machine trains the model the results were measured with
        num_threads=SPM_TRAINING_THREADS,
        minloglevel=2,
    )


def encode(args):
    """TOK/SPLIT.{src,tgt}: pieces joined by spaces. Training pairs with an empty side or a side longer
    than --max-train-pieces are left out (both sides, so the files stay parallel); the evaluation
    splits are kept whole, or their translations could not be scored against the references."""
    sp = spm.SentencePieceProcessor(model_file=args.model)
    threads = os.cpu_count() or 1
    os.makedirs(args.out_dir, exist_ok=True)
    for split in args.splits.split(","):
        keep_all = split != "train"
        kept = dropped = 0
        with open(os.path.join(args.raw_dir, f"{split}.{args.src}"), encoding="utf-8") as src, \
                open(os.path.join(args.raw_dir, f"{split}.{args.tgt}"), encoding="utf-8") as tgt, \
                open(os.path.join(args.out_dir, f"{split}.{args.src}"), "w", encoding="utf-8") as src_out, \
                open(os.path.join(args.out_dir, f"{split}.{args.tgt}"), "w", encoding="utf-8") as tgt_out:
            pairs = zip(src, tgt, strict=True)
            while chunk := list(itertools.islice(pairs, ENCODE_CHUNK)):
                sources, targets = ([line.rstrip("\n") for line in side] for side in zip(*chunk, strict=True))
                for s, t in zip(sp.encode(sources, out_type=str, num_threads=threads),
                                sp.encode(targets, out_type=str, num_threads=threads), strict=True):
                    if keep_all or (0 < len(s) <= args.max_train_pieces and 0 < len(t) <= args.max_train_pieces):
                        src_out.write(" ".join(s) + "\n")
                        tgt_out.write(" ".join(t) + "\n")
                        kept += 1
                    else:
                        dropped += 1
        print(f"{split}: {kept} pairs encoded" + (f", {dropped} left out (empty or too long)" if dropped else ""))


def hypotheses(args):
    """Collect fairseq-generate's ``H-<id>`` lines, check that every sentence of the reference came back
    exactly once, and write the sentencepiece-decoded hypotheses in input order."""
    expected = count_lines(args.reference)
    by_id = {}
    for line in read_lines(args.generate):
        match = re.match(r"H-(\d+)\t[^\t]*\t(.*)$", line)
        if match:
            sentence_id = int(match.group(1))
            if sentence_id in by_id:
                sys.exit(f"{args.generate}: sentence {sentence_id} translated twice")
            by_id[sentence_id] = match.group(2)
    if sorted(by_id) != list(range(expected)):
        missing = sorted(set(range(expected)) - set(by_id))
        sys.exit(
            f"{args.generate}: {len(by_id)} translations for the {expected} sentences of {args.reference} "
            f"(missing ids: {missing[:10]}{' ...' if len(missing) > 10 else ''})"
        )
    sp = spm.SentencePieceProcessor(model_file=args.model)
    write_lines(args.out, sp.decode([by_id[i].split() for i in range(expected)]))
    print(f"{expected} hypotheses written to {args.out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="gather a corpus, or the first lines of its splits")
    p.add_argument("--src", required=True)
    p.add_argument("--tgt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--train", required=True, help="training corpus prefix")
    p.add_argument("--valid", required=True, help="validation corpus prefix")
    p.add_argument("--test", action="append", required=True, metavar="NAME=PREFIX", help="a test set (repeatable)")
    p.add_argument("--train-lines", type=int, help="keep the first N training pairs (default: all)")
    p.add_argument("--eval-lines", type=int, help="keep the first N pairs of the validation and test sets")
    p.add_argument("--speed-lines", type=int, required=True, help="sentences of the speed split")
    p.set_defaults(func=prepare)

    p = commands.add_parser("spm-train", help="train a joint sentencepiece unigram model")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-prefix", required=True)
    p.add_argument("--input-sentences", type=int, default=0, help="train on a random sample of N lines (0: all)")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=spm_train)

    p = commands.add_parser("encode", help="encode splits of a corpus into sentencepiece pieces")
    p.add_argument("--model", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--tgt", required=True)
    p.add_argument("--raw-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--splits", required=True, help="comma-separated split names")
    p.add_argument("--max-train-pieces", type=int, default=250)
    p.set_defaults(func=encode)

    p = commands.add_parser("hypotheses", help="fairseq-generate output -> detokenized hypotheses, counted")
    p.add_argument("--model", required=True)
    p.add_argument("--reference", required=True, help="the raw reference: its line count is the expected count")
    p.add_argument("--generate", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=hypotheses)

    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
