"""Translation pairs whose batches carry the teacher's cached top-k distribution."""

import torch
from fairseq.data import BaseWrapperDataset, LanguagePairDataset

from fairseq_kd.data.batch_keys import TEACHER_TOPK_IDS, TEACHER_TOPK_LPROBS
from fairseq_kd.teacher_cache import TeacherCache


class TeacherCacheDataset(BaseWrapperDataset):
    """A :class:`LanguagePairDataset` with the offline teacher's top-k at every target position.

    Each batch gains, aligned row for row and position for position with ``sample["target"]``
    (B x T, padded on the side ``left_pad_target`` says):

    - :data:`~fairseq_kd.data.batch_keys.TEACHER_TOPK_IDS`: LongTensor B x T x k, the teacher's k
      most probable tokens, best first;
    - :data:`~fairseq_kd.data.batch_keys.TEACHER_TOPK_LPROBS`: HalfTensor B x T x k (float16, as
      stored), their log-probabilities at T = 1. Kept in float16 because fairseq's ``--bf16`` casts
      every float32 tensor of a batch to bf16, which would round them further; the loss computes in
      float32.

    Padding positions hold the pad index and log-probability 0. Sizes, batching, ordering and
    filtering are the wrapped dataset's (inherited from :class:`BaseWrapperDataset`).

    Args:
        dataset: the pairs the cache was built for (same split, same target side).
        cache: the :class:`TeacherCache`; refused (ValueError) unless its per-sentence lengths and
            target dictionary match ``dataset``'s.
    """

    def __init__(self, dataset: LanguagePairDataset, cache: TeacherCache):
        super().__init__(dataset)
        if dataset.tgt is None:
            raise ValueError("a teacher cache needs a dataset with targets (the cache is per target token)")
        cache.check_matches(dataset.tgt_sizes, dataset.tgt_dict)
        self.cache = cache

    def __getitem__(self, index):
        item = self.dataset[index]
        item[TEACHER_TOPK_IDS], item[TEACHER_TOPK_LPROBS] = self.cache.get(index)
        return item

    def collater(self, samples, pad_to_length=None):
        batch = self.dataset.collater(samples, pad_to_length=pad_to_length)
        if len(samples) == 0:
            return batch
        by_id = {s["id"]: s for s in samples}
        target = batch["target"]
        bsz, tgt_len = target.shape
        ids = target.new_full((bsz, tgt_len, self.cache.k), self.dataset.tgt_dict.pad())
        lprobs = torch.zeros(bsz, tgt_len, self.cache.k, dtype=torch.float16)
        for row, sample_id in enumerate(batch["id"].tolist()):  # the wrapped collater's order
            sample = by_id[sample_id]
            n = len(sample[TEACHER_TOPK_IDS])
            positions = slice(tgt_len - n, tgt_len) if self.dataset.left_pad_target else slice(0, n)
            ids[row, positions] = sample[TEACHER_TOPK_IDS]
            lprobs[row, positions] = sample[TEACHER_TOPK_LPROBS]
        batch[TEACHER_TOPK_IDS] = ids
        batch[TEACHER_TOPK_LPROBS] = lprobs
        return batch
