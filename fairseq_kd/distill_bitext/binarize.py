"""Write text lines as the binarized dataset ``fairseq-train`` reads.

Each line is encoded with the given fairseq :class:`~fairseq.data.Dictionary` exactly as
``fairseq-preprocess --srcdict ... --tgtdict ...`` encodes it (``Dictionary.encode_line``,
whitespace tokens, end-of-sentence appended, unknown symbols mapped to ``<unk>``) and stored with
fairseq's ``mmap`` indexed-dataset builder, so the files equal what fairseq-preprocess would make
from the same text and dictionaries, without a second pass over the data in a subprocess.
"""

import os
import shutil
from typing import List, Sequence

import numpy as np
from fairseq.data import Dictionary, indexed_dataset

from fairseq_kd.distill_bitext.shards import CountMismatchError
from fairseq_kd.fileio import atomic_output


def binarize_lines(lines: Sequence[str], dictionary: Dictionary, prefix: str) -> None:
    """Write ``prefix.bin`` and ``prefix.idx`` holding ``lines``, each replaced atomically once
    reading the new files back shows one item per line (before either replaces anything)."""
    with atomic_output(prefix + ".bin") as tmp_bin, atomic_output(prefix + ".idx") as tmp_idx:
        builder = indexed_dataset.make_builder(tmp_bin, impl="mmap", vocab_size=len(dictionary))
        for line in lines:
            builder.add_item(dictionary.encode_line(line, add_if_not_exist=False, append_eos=True).long())
        builder.finalize(tmp_idx)
        index = indexed_dataset.MMapIndexedDataset.Index(tmp_idx)
        sentences, tokens = len(index), int(index.sizes.sum()) * np.dtype(index.dtype).itemsize
        del index  # unmaps the new index
        if sentences != len(lines) or os.path.getsize(tmp_bin) != tokens:
            raise CountMismatchError(
                f"{prefix}.{{bin,idx}} would hold {sentences} sentences ({os.path.getsize(tmp_bin)} bytes of "
                f"tokens for {tokens} indexed), expected {len(lines)} sentences; nothing was replaced"
            )


def binarized_prefix(directory: str, split: str, src: str, tgt: str, lang: str) -> str:
    """fairseq's name for one side of a binarized split: ``DIR/split.src-tgt.lang``."""
    return os.path.join(directory, f"{split}.{src}-{tgt}.{lang}")


def empty_binarized_files(data: str, split: str, src: str, tgt: str) -> List[str]:
    """The zero-byte ``.bin`` files of ``split`` in ``data`` (either direction in the name): a split
    with no sentences, which fairseq's indexed dataset cannot open (it cannot map an empty file)."""
    return [
        prefix + ".bin"
        for pair in ((src, tgt), (tgt, src))
        for prefix in (binarized_prefix(data, split, *pair, lang) for lang in (src, tgt))
        if os.path.isfile(prefix + ".bin") and os.path.getsize(prefix + ".bin") == 0
    ]


def copy_binarized_split(data: str, destdir: str, split: str, src: str, tgt: str) -> bool:
    """Copy both sides of ``split`` from ``data`` into ``destdir``; False if ``data`` lacks it.

    Lets ``fairseq-train DESTDIR`` validate on the original (gold) validation set.
    """
    sources = {}
    for lang in (src, tgt):
        for pair in ((src, tgt), (tgt, src)):  # fairseq accepts either direction in the name
            prefix = binarized_prefix(data, split, *pair, lang)
            if os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx"):
                sources[lang] = prefix
                break
        else:
            return False
    for lang, prefix in sources.items():
        for ext in (".bin", ".idx"):
            with atomic_output(binarized_prefix(destdir, split, src, tgt, lang) + ext) as tmp:
                shutil.copyfile(prefix + ext, tmp)
    return True
