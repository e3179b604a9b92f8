"""Write text lines as the binarized dataset ``fairseq-train`` reads.

Each line is encoded with the given fairseq :class:`~fairseq.data.Dictionary` exactly as
``fairseq-preprocess --srcdict ... --tgtdict ...`` encodes it (``Dictionary.encode_line``,
whitespace tokens, end-of-sentence appended, unknown symbols mapped to ``<unk>``) and stored with
fairseq's ``mmap`` indexed-dataset builder, so the files equal what fairseq-preprocess would make
from the same text and dictionaries, without a second pass over the data in a subprocess.
"""

import os
import shutil
from typing import Sequence

from fairseq.data import Dictionary, indexed_dataset

from fairseq_kd.distill_bitext.shards import CountMismatchError, atomic_output


def binarize_lines(lines: Sequence[str], dictionary: Dictionary, prefix: str) -> None:
    """Write ``prefix.bin`` and ``prefix.idx`` holding ``lines``, each replaced atomically, and
    check by reading them back that they hold one item per line."""
    with atomic_output(prefix + ".bin") as tmp_bin, atomic_output(prefix + ".idx") as tmp_idx:
        builder = indexed_dataset.make_builder(tmp_bin, impl="mmap", vocab_size=len(dictionary))
        for line in lines:
            builder.add_item(dictionary.encode_line(line, add_if_not_exist=False, append_eos=True).long())
        builder.finalize(tmp_idx)
    written = len(indexed_dataset.MMapIndexedDataset(prefix))
    if written != len(lines):
        raise CountMismatchError(f"{prefix}.bin holds {written} sentences, expected {len(lines)}")


def binarized_prefix(directory: str, split: str, src: str, tgt: str, lang: str) -> str:
    """fairseq's name for one side of a binarized split: ``DIR/split.src-tgt.lang``."""
    return os.path.join(directory, f"{split}.{src}-{tgt}.{lang}")


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
