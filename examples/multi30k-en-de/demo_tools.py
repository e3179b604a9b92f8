"""Text helpers for demo.sh: sentencepiece training/encoding, reading fairseq-generate output back
into detokenized sentences in input order, sacreBLEU scoring and parameter counts.

    python demo_tools.py train-spm --vocab-size 4000 --model-prefix DIR/spm FILE...
    python demo_tools.py encode --model DIR/spm.model --out-dir TOK FILE...
    python demo_tools.py hypotheses --model DIR/spm.model --expected N GENERATE_OUTPUT HYP_FILE
    python demo_tools.py bleu REF_FILE HYP_FILE
    python demo_tools.py params --user-dir PLUGIN_DIR CHECKPOINT
"""

import argparse
import os
import re
import sys

import sentencepiece as spm
from sacrebleu.metrics import BLEU


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def train_spm(args):
    # One unigram model over both languages, so that source and target share one vocabulary
    # (fairseq-preprocess --joined-dictionary, --share-all-embeddings).
    spm.SentencePieceTrainer.train(
        input=",".join(args.files),
        model_prefix=args.model_prefix,
        vocab_size=args.vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )


def encode(args):
    sp = spm.SentencePieceProcessor(model_file=args.model)
    for path in args.files:
        pieces = sp.encode(read_lines(path), out_type=str)
        write_lines(os.path.join(args.out_dir, os.path.basename(path)), [" ".join(p) for p in pieces])


def hypotheses(args):
    """Collect fairseq-generate's ``H-<id>`` lines, check that every input sentence came back exactly
    once, and write the sentencepiece-decoded hypotheses in input order."""
    by_id = {}
    for line in read_lines(args.generate_output):
        match = re.match(r"H-(\d+)\t[^\t]*\t(.*)$", line)
        if match:
            sentence_id = int(match.group(1))
            if sentence_id in by_id:
                sys.exit(f"{args.generate_output}: sentence {sentence_id} translated twice")
            by_id[sentence_id] = match.group(2)
    if sorted(by_id) != list(range(args.expected)):
        missing = sorted(set(range(args.expected)) - set(by_id))
        sys.exit(
            f"{args.generate_output}: {len(by_id)} translations for {args.expected} input sentences "
            f"(missing ids: {missing[:10]}{' ...' if len(missing) > 10 else ''})"
        )
    sp = spm.SentencePieceProcessor(model_file=args.model)
    write_lines(args.hyp_file, sp.decode([by_id[i].split() for i in range(args.expected)]))


def bleu(args):
    refs, hyps = read_lines(args.ref_file), read_lines(args.hyp_file)
    if len(refs) != len(hyps):
        sys.exit(f"{args.hyp_file} has {len(hyps)} lines, reference {args.ref_file} has {len(refs)}")
    metric = BLEU()
    score = metric.corpus_score(hyps, [refs])
    print(f"{score.score:.2f}\t{metric.get_signature()}")


def params(args):
    """Print the number of distinct parameters of the model in a fairseq checkpoint (tied
    embeddings counted once)."""
    from fairseq import checkpoint_utils, utils  # imported here: slow, and only needed here

    # The plugin registers its task (needed to rebuild a student) and lets torch's safe loader
    # read fairseq checkpoints.
    utils.import_user_module(argparse.Namespace(user_dir=args.user_dir))
    models, _ = checkpoint_utils.load_model_ensemble([args.checkpoint])
    print(sum(p.numel() for p in models[0].parameters()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train-spm", help="train a joint sentencepiece unigram model")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-prefix", required=True)
    p.add_argument("files", nargs="+")
    p.set_defaults(func=train_spm)

    p = commands.add_parser("encode", help="write each FILE as space-separated pieces into --out-dir")
    p.add_argument("--model", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("files", nargs="+")
    p.set_defaults(func=encode)

    p = commands.add_parser("hypotheses", help="fairseq-generate output -> detokenized hypotheses")
    p.add_argument("--model", required=True)
    p.add_argument("--expected", type=int, required=True, help="number of input sentences")
    p.add_argument("generate_output")
    p.add_argument("hyp_file")
    p.set_defaults(func=hypotheses)

    p = commands.add_parser("bleu", help="print corpus BLEU and its sacreBLEU signature, tab-separated")
    p.add_argument("ref_file")
    p.add_argument("hyp_file")
    p.set_defaults(func=bleu)

    p = commands.add_parser("params", help="print the parameter count of a checkpoint's model")
    p.add_argument("--user-dir", required=True, help="the fairseq_kd package directory")
    p.add_argument("checkpoint")
    p.set_defaults(func=params)

    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
