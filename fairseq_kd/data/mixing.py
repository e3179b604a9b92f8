"""Mixing gold and teacher-translated pairs at the data level.

* concat: gold + teacher pairs (+ any extra pairs such as back-translations) as one training set,
  Gordon & Duh 2019's "base+kd" (sequence-level KD as data augmentation).
* ratio: each epoch draws from every source in fixed proportions, e.g. gold 0.66 : teacher 0.34 as
  in the hybrid example of NVIDIA's NeMo NMT-distillation guide; the draw is deterministic given
  the seed and the epoch.
* a fixed random fraction of the gold pairs (the low-data regime: e.g. 5% of gold pairs plus
  teacher translations of all sources, mixed 1:2), the same subset in every epoch.
"""

import math
from typing import List, Sequence

import numpy as np
from fairseq.data import ConcatDataset, LanguagePairDataset, ResamplingDataset, data_utils

from fairseq_kd.data.sized_pairs import SizedPairsDataset


class FixedSubsetDataset(SizedPairsDataset):
    """The pairs of ``dataset`` at ``indices`` (kept in every epoch)."""

    def __init__(self, dataset: LanguagePairDataset, indices: np.ndarray):
        super().__init__(dataset)
        self.indices = np.sort(indices).astype(np.int64)

    @classmethod
    def random_fraction(cls, dataset: LanguagePairDataset, fraction: float, seed: int) -> "FixedSubsetDataset":
        """``ceil(fraction * len(dataset))`` pairs drawn without replacement, fixed by ``seed``."""
        size = int(np.ceil(len(dataset) * fraction))
        with data_utils.numpy_seed(seed):
            return cls(dataset, np.random.choice(len(dataset), size, replace=False))

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]

    def __len__(self):
        return len(self.indices)

    @property
    def sizes(self):
        return self.dataset.sizes[self.indices]

    def num_tokens(self, index):
        return self.dataset.num_tokens(self.indices[index])

    def num_tokens_vec(self, indices):
        return self.dataset.num_tokens_vec(self.indices[indices])

    def size(self, index):
        return self.dataset.size(self.indices[index])

    def prefetch(self, indices):
        self.dataset.prefetch(self.indices[indices])


def parse_ratios(ratios: str, n_sources: int) -> List[float]:
    """``"0.34:0.66"`` -> ``[0.34, 0.66]``, normalised to sum to 1; one ratio per data source."""
    try:
        values = [float(r) for r in ratios.split(":")]
    except ValueError:
        raise ValueError(f"--mix-ratios must be numbers joined by ':' (e.g. 0.34:0.66), got {ratios!r}") from None
    if len(values) != n_sources:
        raise ValueError(
            f"--mix-ratios {ratios!r} gives {len(values)} ratios for {n_sources} data sources "
            "(gold, teacher, then each --extra-data directory, in that order)"
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"--mix-ratios must be finite numbers (e.g. 1:2), got {ratios!r}")
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"--mix-ratios must be non-negative and not all zero, got {ratios!r}")
    return [v / sum(values) for v in values]


def mix_by_ratio(sources: Sequence[LanguagePairDataset], ratios: Sequence[float], epoch_size: int, seed: int, epoch: int):
    """Each epoch, ``ratio_i * epoch_size`` pairs drawn from source i (with replacement only where a
    source has fewer pairs than that; a source of exactly that many gives every pair once),
    deterministic given ``seed`` and the epoch."""
    parts = []
    for i, (source, ratio) in enumerate(zip(sources, ratios)):
        if ratio == 0:
            continue
        size_ratio = ratio * epoch_size / len(source)
        if math.isclose(size_ratio, 1.0):
            parts.append(source)  # exactly its share: every pair once (the batches are shuffled anyway)
            continue
        parts.append(
            ResamplingDataset(
                source, replace=size_ratio > 1.0, size_ratio=size_ratio, seed=seed + 1000 * i, epoch=epoch
            )
        )
    return ConcatDataset(parts)
