"""Gold pairs with the teacher's translation of the same source as a second target."""

import numpy as np
import torch
from fairseq.data import FairseqDataset, LanguagePairDataset, data_utils
from fairseq.data.indexed_dataset import MMapIndexedDataset

from fairseq_kd.data.batch_keys import TEACHER_NET_INPUT, TEACHER_NTOKENS, TEACHER_TARGET
from fairseq_kd.data.sized_pairs import SizedPairsDataset

_TOKENS_PER_BLOCK = 1 << 24  # tokens compared at once by the fast path of check_aligned


def check_aligned(gold: LanguagePairDataset, teacher: LanguagePairDataset, where: str) -> None:
    """Refuse teacher pairs whose sources are not the gold sources, sentence by sentence.

    Raises ValueError naming the first misaligned sentence id and how to rebuild the data.
    """
    fix = (
        f"rebuild the teacher targets in {where} from this data directory and split with "
        "fairseq-kd-distill-data (selection top1 or closest; nbest-k gives several targets per "
        "source and can only be mixed with --kd-data-mode concat or ratio)"
    )
    if len(gold) != len(teacher):
        raise ValueError(f"teacher targets are misaligned: {len(teacher)} teacher pairs for {len(gold)} gold pairs; {fix}")
    differing = np.flatnonzero(gold.src_sizes != teacher.src_sizes)
    if len(differing) == 0:
        differing = _differing_sentences(gold.src, teacher.src)
    if len(differing) > 0:
        raise ValueError(
            f"teacher targets are misaligned: the source of sentence id {differing[0]} differs between the gold "
            f"data and {where} ({len(differing)} sentences differ); {fix}"
        )


def _differing_sentences(a, b) -> np.ndarray:
    """Ids of the sentences that differ between two token datasets of equal sentence lengths.

    Binarized (mmap) data of one token type is compared in blocks of its token buffers, which takes
    seconds for millions of sentences; other datasets sentence by sentence."""
    if not (isinstance(a, MMapIndexedDataset) and isinstance(b, MMapIndexedDataset) and a._index.dtype == b._index.dtype):
        return np.array([i for i in range(len(a)) if not torch.equal(a[i], b[i])], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(a.sizes)])  # sentence i's tokens: starts[i] to starts[i + 1]
    tokens_a, tokens_b = (np.frombuffer(d._bin_buffer, dtype=d._index.dtype, count=int(starts[-1])) for d in (a, b))
    offsets = [
        begin + np.flatnonzero(tokens_a[begin:begin + _TOKENS_PER_BLOCK] != tokens_b[begin:begin + _TOKENS_PER_BLOCK])
        for begin in range(0, int(starts[-1]), _TOKENS_PER_BLOCK)
    ]
    offsets = np.concatenate(offsets) if offsets else np.zeros(0, dtype=np.int64)
    return np.unique(np.searchsorted(starts, offsets, side="right") - 1)


class TeacherTargetDataset(SizedPairsDataset):
    """A :class:`LanguagePairDataset` whose batches also carry the teacher's target.

    Each batch gains :data:`~fairseq_kd.data.batch_keys.TEACHER_TARGET` (B x T', padded like
    ``target``), :data:`~fairseq_kd.data.batch_keys.TEACHER_NET_INPUT` (``net_input`` with
    ``prev_output_tokens`` built from the teacher's target, the teacher-forced prefix for a second
    student pass) and :data:`~fairseq_kd.data.batch_keys.TEACHER_NTOKENS`. Sizes, and so batching,
    ordering and filtering, count the longer of the two targets: a second pass may hold no more
    tokens than ``--max-tokens`` allows, and over-long teacher targets are filtered like over-long
    gold ones.

    Args:
        gold: the gold pairs.
        teacher: pairs (same source, teacher translation) aligned id by id with ``gold``.
    """

    def __init__(self, gold: LanguagePairDataset, teacher: LanguagePairDataset):
        super().__init__(gold)
        self.teacher_targets = teacher.tgt
        self.teacher_sizes = teacher.tgt_sizes
        self._sizes = np.vstack((gold.src_sizes, np.maximum(gold.tgt_sizes, self.teacher_sizes))).T

    def __getitem__(self, index):
        item = self.dataset[index]
        item[TEACHER_TARGET] = self.teacher_targets[index]
        return item

    def collater(self, samples, pad_to_length=None):
        batch = self.dataset.collater(samples, pad_to_length=pad_to_length)
        if len(samples) == 0:
            return batch
        by_id = {s["id"]: s[TEACHER_TARGET] for s in samples}
        targets = [by_id[i] for i in batch["id"].tolist()]  # the gold collater's order
        pad, eos = self.dataset.tgt_dict.pad(), self.dataset.tgt_dict.eos()
        left_pad = self.dataset.left_pad_target
        batch[TEACHER_TARGET] = data_utils.collate_tokens(targets, pad, eos, left_pad)
        batch[TEACHER_NTOKENS] = sum(len(t) for t in targets)
        batch[TEACHER_NET_INPUT] = dict(
            batch["net_input"],
            prev_output_tokens=data_utils.collate_tokens(targets, pad, eos, left_pad, move_eos_to_beginning=True),
        )
        return batch

    @property
    def sizes(self):
        return self._sizes

    def num_tokens(self, index):
        return max(self.dataset.num_tokens(index), int(self.teacher_sizes[index]))

    def num_tokens_vec(self, indices):
        return np.maximum(self.dataset.num_tokens_vec(indices), self.teacher_sizes[indices])

    def size(self, index):
        src, tgt = self.dataset.size(index)
        return src, max(tgt, int(self.teacher_sizes[index]))

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        """Batches by this dataset's own token counts (the longer target), not the gold pairs'."""
        return FairseqDataset.batch_by_size(self, indices, max_tokens, max_sentences, required_batch_size_multiple)
