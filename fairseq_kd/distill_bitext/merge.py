"""Assemble the finished shards into the distilled training set.

Reads every shard in order, checks that together they hold each sentence of the split exactly
once with the promised number of pairs, applies the filters (some need the whole split), and
writes, each file atomically:

* ``SPLIT.kd.SRC`` / ``SPLIT.kd.TGT``: aligned text in the data's subword units, in the original
  sentence order (pairs of one sentence in n-best order);
* ``dict.SRC.txt`` / ``dict.TGT.txt`` and ``SPLIT.SRC-TGT.{SRC,TGT}.{bin,idx}``: the same pairs
  binarized with the data's dictionaries (:mod:`.binarize`), plus copies of other binarized splits
  (``--copy-splits``, e.g. the gold validation set, unless that split is itself distilled into
  the directory), so ``fairseq-train DESTDIR`` reads the result;
* ``SPLIT.kd.summary.json``: the counts (deterministic, so a resumed run writes the same bytes).
"""

import logging
import os
import shutil
from typing import Dict, List, Sequence

from fairseq.data import Dictionary

from fairseq_kd.distill_bitext.binarize import binarize_lines, binarized_prefix, copy_binarized_split
from fairseq_kd.distill_bitext.filters import FilterConfig, Pair, apply_filters
from fairseq_kd.distill_bitext.shards import CountMismatchError, DistillDataError, ShardLayout, split_state_path
from fairseq_kd.fileio import atomic_output, write_file, write_json

logger = logging.getLogger(__name__)


def collect_pairs(layout: ShardLayout, num_sentences: int) -> Dict:
    """Every pair of every shard in sentence order, checked against ``num_sentences``."""
    missing = layout.missing()
    if missing:
        raise DistillDataError(
            f"cannot merge: {len(missing)} of {len(layout)} shards are not done yet (shards {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}); run the remaining workers first"
        )
    pairs: List[Pair] = []
    skipped = 0
    n_records = 0
    for k in range(len(layout)):
        for record in layout.read(k):
            n_records += 1
            skipped += bool(record.skipped)
            pairs.extend(Pair(record.id, record.src, h.text, h.score, h.rank) for h in record.pairs)
    expected_pairs = (num_sentences - skipped) * layout.pairs_per_sentence
    if n_records != num_sentences or len(pairs) != expected_pairs:
        raise CountMismatchError(
            f"the shards hold {n_records} sentences and {len(pairs)} pairs; the split has {num_sentences} "
            f"sentences ({skipped} skipped), which make {expected_pairs} pairs"
        )
    return {"pairs": pairs, "skipped": skipped}


def write_lines(path: str, lines: Sequence[str]) -> None:
    """Write ``lines`` atomically, once the new file is counted to hold exactly that many lines."""

    def count(tmp: str) -> None:
        with open(tmp, encoding="utf-8") as f:
            written = sum(1 for _ in f)
        if written != len(lines):
            raise CountMismatchError(
                f"{path} would have {written} lines, expected {len(lines)} (a text holds a line break); "
                "nothing was replaced"
            )

    write_file(path, lambda out: out.writelines(line + "\n" for line in lines), verify=count)


def merge(layout: ShardLayout, num_sentences: int, data: str, destdir: str, split: str, src: str, tgt: str,
          filters: FilterConfig, copy_splits: Sequence[str], selection: str) -> Dict:
    """Merge, filter and write the outputs of a complete run; return the summary it saves."""
    collected = collect_pairs(layout, num_sentences)
    selected = collected["pairs"]
    kept, removed = apply_filters(selected, filters)

    write_lines(os.path.join(destdir, f"{split}.kd.{src}"), [p.src for p in kept])
    write_lines(os.path.join(destdir, f"{split}.kd.{tgt}"), [p.hyp for p in kept])
    for lang, lines in ((src, [p.src for p in kept]), (tgt, [p.hyp for p in kept])):
        dict_path = os.path.join(destdir, f"dict.{lang}.txt")
        with atomic_output(dict_path) as tmp:
            shutil.copyfile(os.path.join(data, f"dict.{lang}.txt"), tmp)
        binarize_lines(lines, Dictionary.load(dict_path), binarized_prefix(destdir, split, src, tgt, lang))

    copied = []
    for other in copy_splits:
        if other == split or os.path.exists(split_state_path(destdir, other, "args.json")):
            logger.info(f"--copy-splits: not copying {other!r}, it is distilled into {destdir}")
        elif copy_binarized_split(data, destdir, other, src, tgt):
            copied.append(other)
        else:
            logger.warning(f"--copy-splits: {data} has no binarized split {other!r}; not copied")

    summary = {
        "split": split,
        "sentences": num_sentences,
        "shards": len(layout),
        "skipped_too_long": collected["skipped"],
        "selection": selection,
        "pairs_selected": len(selected),
        "pairs_not_teacher_top1": sum(p.rank > 0 for p in selected),
        "removed": removed,
        "pairs_written": len(kept),
        "copied_splits": copied,
    }
    write_json(split_state_path(destdir, split, "summary.json"), summary, indent=1)
    return summary
