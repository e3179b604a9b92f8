"""``fairseq-kd-distill-data``: translate a binarized split with a teacher and write the result as
distillation training data (sequence-level KD, Kim & Rush 2016; n-best pairs, Gordon & Duh 2019).

    fairseq-kd-distill-data data-bin --teacher-path teacher/checkpoint_best.pt \\
        --split train --destdir data-bin-kd --beam 5 --select top1
    fairseq-train data-bin-kd --arch transformer ...   # the student learns the teacher's outputs

Work is cut into shards saved atomically, so a killed run resumes where it stopped, and
``--num-workers N --worker-id i`` lets N processes (a job array) share the shards; the outputs are
merged when every shard is done. See docs/distill-data.md.
"""

import argparse
import dataclasses
import logging
import os
import time
from typing import List, Optional, Sequence

import torch
from fairseq.dataclass.configs import GenerationConfig

import fairseq_kd  # noqa: F401  (safe loading of fairseq checkpoints)
from fairseq_kd.cli.errors import run_command
from fairseq_kd.cli.inputs import add_cpu_argument, add_teacher_arguments, load_split, load_teacher, teacher_device
from fairseq_kd.cli.progress import Progress
from fairseq_kd.ct2_export import QUANTIZATIONS
from fairseq_kd.distill_bitext import ct2_engine
from fairseq_kd.distill_bitext.filters import FILTER_NAMES, FilterConfig
from fairseq_kd.distill_bitext.merge import merge
from fairseq_kd.distill_bitext.selection import METRICS, SUBWORD_SCHEMES, Selection, parse_selection, select
from fairseq_kd.distill_bitext.shards import (
    CountMismatchError,
    DistillDataError,
    SentenceRecord,
    ShardLayout,
    check_destdir,
    check_manifest,
    split_state_path,
    worker_shards,
)
from fairseq_kd.distill_bitext.translate import SplitTranslator, TeacherTranslator
from fairseq_kd.fileio import teacher_files

logger = logging.getLogger("fairseq_kd.cli.distill_data")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-distill-data",
        description="Translate a binarized split with a teacher (fairseq's beam search) and write the "
        "teacher's outputs as aligned text and as a binarized dataset fairseq-train reads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("data", help="binarized data directory (fairseq-preprocess output) with the teacher's "
                        "dictionaries")
    io = parser.add_argument_group("input and output")
    add_teacher_arguments(io)
    io.add_argument("--destdir", required=True,
                    help="output directory: SPLIT.kd.SRC/TGT text, dictionaries and binarized SPLIT, and "
                    "the run's state SPLIT.kd.{shards/,args.json,summary.json}; may hold several splits")
    io.add_argument("--split", default="train", help="split of DATA to translate")
    io.add_argument("-s", "--source-lang", default=None, help="source language (default: inferred from DATA)")
    io.add_argument("-t", "--target-lang", default=None, help="target language (default: inferred from DATA)")
    io.add_argument("--copy-splits", default="valid",
                    help="comma-separated binarized splits to copy unchanged from DATA into --destdir "
                    "(e.g. the gold validation set fairseq-train needs); '' copies none")

    gen = parser.add_argument_group("generation (fairseq's SequenceGenerator)")
    gen.add_argument("--beam", type=int, default=5, help="beam size; 1 is greedy decoding")
    gen.add_argument("--nbest", type=int, default=None,
                     help="hypotheses kept per sentence (<= --beam); default: the beam for --select "
                     "closest, K for nbest-K, 1 for top1")
    gen.add_argument("--max-len-a", type=float, default=0,
                     help="generate at most max_len_a * source length + max_len_b tokens")
    gen.add_argument("--max-len-b", type=int, default=200, help="see --max-len-a")
    gen.add_argument("--min-len", type=int, default=1, help="minimum generation length")
    gen.add_argument("--lenpen", type=float, default=1, help="length penalty: scores are divided by length ** lenpen")
    gen.add_argument("--unkpen", type=float, default=0, help="unknown-word penalty (> 0 discourages <unk>)")
    gen.add_argument("--max-tokens", type=int, default=12000, help="maximum tokens in a batch")
    gen.add_argument("--batch-size", type=int, default=None, help="maximum sentences in a batch")
    gen.add_argument("--engine", choices=ct2_engine.ENGINES, default="fairseq",
                     help="fairseq: fairseq's SequenceGenerator; ctranslate2: the teacher converted once to "
                     "CTranslate2 (in DESTDIR/SPLIT.kd.ct2-teacher; needs pip install -e .[ct2]), same batches, "
                     "shards and selection, about 2x faster on one CPU thread at batch 64, and on a CPU one batch per "
                     "thread at a time (OMP_NUM_THREADS); one teacher, no --unkpen, "
                     "--min-len 1 unless --beam 1 (docs/distill-data.md)")
    gen.add_argument("--ct2-quantization", choices=QUANTIZATIONS, default="float32",
                     help="weights of the CTranslate2 teacher: float32 gives fairseq's translations; int16/int8 "
                     "are faster on CPU and change some of them")

    sel = parser.add_argument_group("selection")
    sel.add_argument("--select", type=parse_selection, default=Selection("top1"), metavar="{top1,closest,nbest-K}",
                     help="top1: the teacher's best hypothesis (Kim & Rush's Seq-KD); closest: the n-best "
                     "hypothesis closest to the reference by --metric (Kim & Rush's Seq-Inter); nbest-K: "
                     "the K best, each as its own pair (Gordon & Duh's best-K)")
    sel.add_argument("--metric", choices=METRICS, default="bleu",
                     help="sentence-level similarity (sacrebleu) for --select closest")
    sel.add_argument("--subword", choices=sorted(SUBWORD_SCHEMES), default="none",
                     help="subword scheme of the data, undone before --metric compares hypothesis and reference: "
                     "sentencepiece ('\u2581' marks word starts), bpe ('@@ ' continuation marks), none")

    flt = parser.add_argument_group("filters (applied when merging; each reports how many pairs it removed)")
    flt.add_argument("--drop-empty", action="store_true", help="drop pairs whose hypothesis is empty")
    flt.add_argument("--max-ngram-repeats", type=int, default=None,
                     help="drop pairs whose hypothesis repeats an n-gram (of --repeat-ngram-order) more than "
                     "this many times")
    flt.add_argument("--repeat-ngram-order", type=int, default=2, help="n-gram order for --max-ngram-repeats")
    flt.add_argument("--min-len-ratio", type=float, default=None,
                     help="drop pairs with hypothesis/source length (in tokens) below this")
    flt.add_argument("--max-len-ratio", type=float, default=None,
                     help="drop pairs with hypothesis/source length (in tokens) above this")
    flt.add_argument("--drop-lowest-score-percent", type=float, default=0,
                     help="drop this percentage of the pairs, those with the lowest teacher scores")

    work = parser.add_argument_group("sharding, resuming, workers")
    work.add_argument("--shard-size", type=int, default=10000,
                      help="sentences per shard, the unit of work that is saved and resumed")
    work.add_argument("--num-workers", type=int, default=1,
                      help="number of processes sharing the shards (e.g. the size of a job array)")
    work.add_argument("--worker-id", type=int, default=0,
                      help="this process's index in [0, --num-workers): it translates shards worker-id, "
                      "worker-id + num-workers, ...")
    work.add_argument("--merge", choices=("auto", "never", "only"), default="auto",
                      help="auto: merge once every shard is done (by whichever worker finishes last); "
                      "never: only translate this worker's shards; only: merge without translating")
    work.add_argument("--skip-too-long", action="store_true",
                      help="leave out source sentences longer than the teacher accepts (counted) instead of failing")

    dev = parser.add_argument_group("device")
    add_cpu_argument(dev)
    dev.add_argument("--fp16", action="store_true", help="run the teacher in fp16 (CUDA only)")
    dev.add_argument("--log-interval", type=float, default=30, help="seconds between progress lines")
    return parser


def resolve_nbest(args) -> int:
    """The n-best size the selection needs, checked against the beam."""
    selection: Selection = args.select
    if selection.k > args.beam:
        raise DistillDataError(
            f"--select {selection} keeps {selection.k} hypotheses per source: needs --beam >= {selection.k}"
        )
    nbest = args.nbest or (args.beam if selection.mode == "closest" else selection.k)
    if not selection.k <= nbest <= args.beam:
        raise DistillDataError(
            f"--nbest must lie in [{selection.k}, --beam={args.beam}] for --select {selection}, got {nbest}"
        )
    if selection.mode == "closest" and nbest < 2:
        raise DistillDataError("--select closest chooses among the n-best: needs --nbest (and --beam) >= 2")
    return nbest


def filter_config(args) -> FilterConfig:
    cfg = FilterConfig(
        drop_empty=args.drop_empty, max_ngram_repeats=args.max_ngram_repeats,
        repeat_ngram_order=args.repeat_ngram_order, min_len_ratio=args.min_len_ratio,
        max_len_ratio=args.max_len_ratio, drop_lowest_score_percent=args.drop_lowest_score_percent,
    )
    try:
        cfg.check()
    except ValueError as e:
        raise DistillDataError(str(e)) from e
    return cfg


def build_manifest(args, task, num_sentences: int, nbest: int, filters: FilterConfig, engine: dict) -> dict:
    """Everything that determines the output, for ``SPLIT.kd.args.json``; not the worker split,
    the merge mode, the device or logging, which change where and how, not what. ``engine``:
    :func:`ct2_engine.engine_record`."""
    return {
        "format": 2,
        "data": os.path.abspath(args.data),
        "split": args.split,
        "source_lang": task.cfg.source_lang,
        "target_lang": task.cfg.target_lang,
        "num_sentences": num_sentences,
        "teachers": teacher_identity(args.teacher_path),
        "teacher_dict_dir": args.teacher_dict_dir and os.path.abspath(args.teacher_dict_dir),
        "fp16": args.fp16,
        "beam": args.beam, "nbest": nbest, "max_len_a": args.max_len_a, "max_len_b": args.max_len_b,
        "min_len": args.min_len, "lenpen": args.lenpen, "unkpen": args.unkpen,
        "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "select": str(args.select), "metric": args.metric, "subword": args.subword,
        "filters": dataclasses.asdict(filters),
        "shard_size": args.shard_size,
        "skip_too_long": args.skip_too_long,
        "copy_splits": split_list(args.copy_splits),
        "engine": engine,
    }


def teacher_identity(value: str) -> List[dict]:
    """Path, size and SHA-256 of each checkpoint of ``--teacher-path`` (each checked to exist): a
    resume with a checkpoint replaced at the same path is refused."""
    try:
        return teacher_files(value)
    except (ValueError, FileNotFoundError) as e:
        raise DistillDataError(str(e)) from e


def split_list(value: str) -> List[str]:
    return [s for s in value.split(",") if s]


def translate_shard(translator: SplitTranslator, ids: range, args, progress: Progress) -> List[SentenceRecord]:
    """One record per sentence of ``ids``: its source text and the selected hypotheses."""

    def report(sentences: int) -> None:
        if progress.update(sentences):
            logger.info(f"translated {progress.line()}")

    nbest, too_long = translator.translate(ids, on_batch=report)
    too_long = set(too_long)
    records = []
    for i in ids:
        src = translator.source_text(i)
        if i in too_long:
            records.append(SentenceRecord(i, src, [], skipped="longer than the teacher's max source positions"))
            continue
        if i not in nbest:
            raise CountMismatchError(f"the teacher returned no translation for sentence {i}")
        reference = translator.reference_text(i) if args.select.mode == "closest" else None
        try:
            chosen = select(nbest[i], args.select, reference, args.metric, args.subword)
        except ValueError as e:
            raise CountMismatchError(f"sentence {i}: {e}") from e
        records.append(SentenceRecord(i, src, chosen))
    return records


def translate_shards(args, task, layout: ShardLayout, shards: Sequence[int], nbest: int, device: torch.device,
                     engine: dict) -> Progress:
    """Load the teacher, translate ``shards`` and save each as soon as it is done."""
    if engine["name"] == "ctranslate2":
        translator = ct2_engine.build_translator(args, task, nbest, device.type == "cuda", engine)
        logger.info(f"teacher: CTranslate2 ({engine['quantization']}) on {translator.device}, "
                    f"{translator.workers} batch(es) at a time, beam {args.beam}, nbest {nbest}, select {args.select}")
    else:
        teacher = load_teacher(args.teacher_path, task, "fp16" if args.fp16 else "fp32", args.teacher_dict_dir, device)
        models = teacher.models
        gen_cfg = GenerationConfig(beam=args.beam, nbest=nbest, max_len_a=args.max_len_a, max_len_b=args.max_len_b,
                                   min_len=args.min_len, lenpen=args.lenpen, unkpen=args.unkpen)
        translator = TeacherTranslator(task, args.split, models, gen_cfg, args.max_tokens, args.batch_size, device,
                                       skip_too_long=args.skip_too_long)
        logger.info(f"teacher: {len(models)} model(s) on {device}{' in fp16' if args.fp16 else ''}, "
                    f"beam {args.beam}, nbest {nbest}, select {args.select}")
    progress = Progress(sum(len(layout.ranges[k]) for k in shards), args.log_interval)
    for k in shards:
        layout.write(k, translate_shard(translator, layout.ranges[k], args, progress))
        logger.info(f"translated shard {k} (sentences {layout.ranges[k].start}..{layout.ranges[k].stop - 1})")
    return progress


def run(args) -> Optional[dict]:
    """Translate this worker's missing shards, then merge if asked and possible; returns the merge
    summary, or None when nothing was merged."""
    start = time.time()
    nbest = resolve_nbest(args)
    filters = filter_config(args)
    engine = ct2_engine.engine_record(args, nbest)
    if os.path.realpath(args.destdir) == os.path.realpath(args.data):
        raise DistillDataError("--destdir must differ from DATA: the outputs would overwrite its binarized splits")
    device = teacher_device(args)
    if args.fp16 and device.type != "cuda":
        raise DistillDataError("--fp16 needs a CUDA device (and no --cpu); on CPU the teacher runs in fp32")

    task = load_split(args.data, args.split, args.source_lang, args.target_lang)
    dataset = task.dataset(args.split)
    num_sentences = len(dataset)
    if args.select.mode == "closest" and dataset.tgt is None:
        raise DistillDataError(f"--select closest needs references, but split {args.split!r} has no target side")
    src, tgt = task.cfg.source_lang, task.cfg.target_lang
    check_destdir(args.destdir, args.data, (src, tgt))
    manifest = build_manifest(args, task, num_sentences, nbest, filters, engine)
    check_manifest(split_state_path(args.destdir, args.split, "args.json"), manifest)
    layout = ShardLayout(args.destdir, args.split, num_sentences, args.shard_size, args.select.k, manifest)
    mine = worker_shards(len(layout), args.num_workers, args.worker_id)
    todo = [] if args.merge == "only" else layout.missing(mine)
    logger.info(
        f"{args.split}: {num_sentences} sentences in {len(layout)} shards of {args.shard_size}; worker "
        f"{args.worker_id}/{args.num_workers} owns {len(mine)}, {len(todo)} still to translate"
    )

    if todo:
        progress = translate_shards(args, task, layout, todo, nbest, device, engine)
        logger.info(
            f"worker {args.worker_id}/{args.num_workers}: translated {len(todo)} shards, {progress.done} sentences "
            f"in {progress.elapsed():.1f}s ({progress.rate():.1f} sentences/s); {len(mine) - len(todo)} of its "
            "shards were done already"
        )

    if args.merge == "never":
        return None
    missing = layout.missing()
    if missing and args.merge == "auto":
        logger.info(f"{len(missing)} shards of other workers are not done yet; the last worker to finish merges "
                    "(or run again with --merge only)")
        return None
    summary = merge(layout, num_sentences, args.data, args.destdir, args.split, src, tgt, filters,
                    split_list(args.copy_splits), str(args.select))
    removed = ", ".join(f"{name} {summary['removed'][name]}" for name in FILTER_NAMES)
    logger.info(
        f"summary: {summary['sentences']} sentences ({summary['skipped_too_long']} skipped as too long), "
        f"{summary['pairs_selected']} pairs selected ({args.select}, {summary['pairs_not_teacher_top1']} not the "
        f"teacher's top hypothesis); removed: {removed}; wrote {summary['pairs_written']} pairs to "
        f"{os.path.join(args.destdir, f'{args.split}.kd.{{{src},{tgt}}}')} and "
        f"{os.path.join(args.destdir, f'{args.split}.{src}-{tgt}.{{{src},{tgt}}}.{{bin,idx}}')}; "
        f"total time {time.time() - start:.1f}s"
    )
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    run_command(parser.prog, lambda: run(args))


if __name__ == "__main__":
    main()
