"""``fairseq-kd-cache-teacher``: run the teacher once over a binarized split and store its top-k
log-probabilities at every target position (see :mod:`fairseq_kd.teacher_cache` for the format).

    fairseq-kd-cache-teacher --teacher-path teacher/checkpoint_best.pt data-bin \\
        --split train --k 8 --destdir cache/train

The teacher (or an ensemble, ``a.pt:b.pt``, whose probabilities are averaged) is teacher-forced on
the target side of ``DATA``: the gold translations, or the teacher's own when ``DATA`` is a
``fairseq-kd-distill-data`` output. Build the cache for the directory and split the student trains
on. The build proceeds in shards of ``--shard-size`` sentences; rerun the same command after an
interruption and only the missing shards are computed.
"""

import argparse
import logging
import os

import numpy as np
from fairseq import utils
from fairseq.data import BaseWrapperDataset

from fairseq_kd.cli.errors import run_command
from fairseq_kd.cli.inputs import add_cpu_argument, add_teacher_arguments, load_split, load_teacher, teacher_device
from fairseq_kd.cli.progress import Progress
from fairseq_kd.fileio import teacher_files
from fairseq_kd.teacher import Teacher
from fairseq_kd.teacher_cache import (
    CacheError,
    TeacherCache,
    TeacherCacheWriter,
    bytes_per_token,
    dictionary_sha256,
    rows_by_sentence,
    teacher_topk,
)

logger = logging.getLogger("fairseq_kd.cli.cache_teacher")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-cache-teacher",
        description="Cache a teacher's top-k log-probabilities (T = 1) at every target position of a "
        "binarized split, for offline word-level distillation.",
    )
    add_teacher_arguments(parser, precision=True)
    add_cpu_argument(parser)
    parser.add_argument("data",
                        help="binarized data directory (fairseq-preprocess or fairseq-kd-distill-data "
                        "output) whose target side the teacher is teacher-forced on")
    parser.add_argument("--split", default="train", help="split to cache (default: train)")
    parser.add_argument("-s", "--source-lang", default=None, help="source language (default: inferred from DATA)")
    parser.add_argument("-t", "--target-lang", default=None, help="target language (default: inferred from DATA)")
    parser.add_argument("--k", type=int, default=8, help="entries kept per target position (default: 8)")
    parser.add_argument("--destdir", required=True, help="cache directory to create or resume")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="maximum tokens per batch (default: 4096)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="maximum sentences per batch (default: no limit besides --max-tokens)")
    parser.add_argument("--shard-size", type=int, default=10000,
                        help="sentences per shard, the unit of resumption (default: 10000)")
    parser.add_argument("--stop-after-shards", type=int, default=None,
                        help="compute at most this many missing shards, then exit without merging; rerun "
                        "to continue (to split a long build across time-limited jobs)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loading processes (default: 0)")
    parser.add_argument("--log-interval", type=float, default=30.0,
                        help="seconds between progress lines within a shard (default: 30)")
    return parser


class IdRangeDataset(BaseWrapperDataset):
    """``dataset``'s sentences with ids in ``[start, end)``, ordered by source then target length
    for batching; sample ids stay those of the full dataset."""

    def __init__(self, dataset, start: int, end: int):
        super().__init__(dataset)
        self.start, self.end = start, end

    def ordered_indices(self):
        ids = np.arange(self.start, self.end, dtype=np.int64)
        return ids[np.lexsort((self.dataset.tgt_sizes[ids], self.dataset.src_sizes[ids]))]


def check_lengths(dataset, teacher: Teacher) -> None:
    """Refuse sentences longer than the teacher's positions: they cannot be scored."""
    max_positions = utils.resolve_max_positions(*(model.max_positions() for model in teacher.models))
    _, too_long = dataset.filter_indices_by_size(np.arange(len(dataset), dtype=np.int64), max_positions)
    if len(too_long) > 0:
        first = too_long[0]
        sizes = tuple(int(n) for n in dataset.size(first))
        raise CacheError(
            f"{len(too_long)} sentences (first id {first}, (source, target) tokens {sizes}) exceed the "
            f"teacher's maximum positions {max_positions}; "
            "remove them from the data (fairseq-train would skip them) and binarize it again"
        )


def cache_teacher(args) -> dict:
    """Build (or resume) the cache that ``args`` describe; return a summary of the run."""
    if args.k < 1:
        raise CacheError(f"--k must be >= 1, got {args.k}")
    if args.stop_after_shards is not None and args.stop_after_shards < 1:
        raise CacheError(
            f"--stop-after-shards must be >= 1 (leave it out to compute every shard), got {args.stop_after_shards}"
        )
    if len(utils.split_paths(args.data)) != 1:
        raise CacheError(f"DATA takes one directory, got {args.data!r}: build one cache per directory")
    task = load_split(args.data, args.split, args.source_lang, args.target_lang)
    dataset = task.dataset(args.split)
    if len(dataset) == 0:
        raise CacheError(f"split {args.split!r} of {args.data} has no sentences")
    tgt_dict = task.target_dictionary
    if args.k > len(tgt_dict):
        raise CacheError(f"--k {args.k} exceeds the target vocabulary size {len(tgt_dict)}")
    device = teacher_device(args)
    teacher = load_teacher(args.teacher_path, task, args.teacher_precision, args.teacher_dict_dir, device)
    check_lengths(dataset, teacher)
    settings = {
        "k": args.k,
        "vocab_size": len(tgt_dict),
        "data": os.path.abspath(args.data),
        "split": args.split,
        "source_lang": task.cfg.source_lang,
        "target_lang": task.cfg.target_lang,
        "dictionary_sha256": dictionary_sha256(tgt_dict),
        "teachers": teacher_files(args.teacher_path),
        "teacher_precision": teacher.resolved_precision,
    }
    writer = TeacherCacheWriter(args.destdir, settings, dataset.tgt_sizes, args.shard_size)
    missing = writer.missing_shards()
    todo = missing[: args.stop_after_shards] if args.stop_after_shards is not None else missing
    if writer.complete:
        TeacherCache(args.destdir)  # refuses missing or damaged arrays, naming the file
        logger.info(f"{args.destdir} already holds the complete cache: nothing to do")
    elif len(missing) < writer.num_shards:
        done = writer.num_shards - len(missing)
        logger.info(f"resuming: {done} of {writer.num_shards} shards done; computing shards {todo}")
    else:
        logger.info(f"computing {len(todo)} of {writer.num_shards} shards of {args.shard_size} sentences")

    progress = Progress(sum(end - start for start, end in map(writer.shard_range, todo)), args.log_interval)
    pad = tgt_dict.pad()
    for index in todo:
        start, end = writer.shard_range(index)
        batches = task.get_batch_iterator(
            dataset=IdRangeDataset(dataset, start, end), max_tokens=args.max_tokens, max_sentences=args.batch_size,
            required_batch_size_multiple=1, num_workers=args.num_workers, disable_iterator_cache=True,
        ).next_epoch_itr(shuffle=False)
        rows = {}
        for sample in batches:
            sample = utils.move_to_cuda(sample) if device.type == "cuda" else sample
            ids, lprobs = teacher_topk(teacher, sample, args.k)
            for sample_id, sentence_ids, sentence_lprobs in rows_by_sentence(sample, ids, lprobs, pad):
                rows[sample_id] = (sentence_ids, sentence_lprobs)
            if progress.update(sample["nsentences"], sample["ntokens"]):
                logger.info(f"shard {index + 1}/{writer.num_shards}: {progress.line()}")
        writer.write_shard(index, rows)
        logger.info(f"shard {index + 1}/{writer.num_shards} (ids {start}-{end - 1}) written: {progress.line()}")

    complete = writer.complete
    if not complete and not writer.missing_shards():
        writer.merge()
        complete = True
    summary = {
        "complete": complete,
        "computed_shards": todo,
        "num_shards": writer.num_shards,
        "num_sentences": len(dataset),
        "num_tokens": int(writer.offsets[-1]),
        "bytes_per_token": bytes_per_token(args.k, writer.id_dtype),
        "total_bytes": writer.total_bytes(),
        "seconds": progress.elapsed(),
        "sentences_per_second": progress.rate(),
        "tokens_per_second": progress.tokens / max(progress.elapsed(), 1e-9),
    }
    id_bytes = writer.id_dtype.itemsize
    logger.info(
        f"this run: {len(todo)} shards, {progress.done:,} sentences, {progress.tokens:,} target tokens in "
        f"{summary['seconds']:.1f} s ({summary['sentences_per_second']:,.1f} sentences/s, "
        f"{summary['tokens_per_second']:,.0f} tokens/s)"
    )
    logger.info(
        f"{'complete' if complete else 'incomplete (rerun to continue)'}: {summary['num_sentences']:,} sentences, "
        f"{summary['num_tokens']:,} target tokens; k={args.k} x (2 B float16 + {id_bytes} B "
        f"{writer.id_dtype.name}) = {summary['bytes_per_token']} B per token ({summary['bytes_per_token'] // args.k} "
        f"B per token per k); total {summary['total_bytes'] / 2**20:,.2f} MiB in {args.destdir}"
    )
    return summary


def main(argv=None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    logging.getLogger("fairseq.tasks.fairseq_task").setLevel(logging.WARNING)  # one batch iterator per shard
    run_command(parser.prog, lambda: cache_teacher(args))


if __name__ == "__main__":
    main()
