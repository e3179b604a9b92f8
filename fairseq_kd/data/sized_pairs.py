"""A wrapper of translation pairs that batches them by sizes of its own."""

import numpy as np
from fairseq.data import BaseWrapperDataset, data_utils


class SizedPairsDataset(BaseWrapperDataset):
    """Base of the wrappers whose ``sizes`` ((N, 2): source and target length per pair) are not the
    wrapped :class:`~fairseq.data.LanguagePairDataset`'s own: they order and filter by them, as the
    wrapped pairs do by theirs (the base class would hand both to the wrapped pairs)."""

    @property
    def sizes(self) -> np.ndarray:
        raise NotImplementedError

    def ordered_indices(self):
        """Shuffled (if the wrapped pairs are), then sorted by target length and, stably, by source
        length, as :class:`~fairseq.data.LanguagePairDataset` orders its pairs."""
        sizes = self.sizes
        order = np.random.permutation(len(self)) if self.dataset.shuffle else np.arange(len(self))
        order = order[np.argsort(sizes[order, 1], kind="mergesort")]
        return order[np.argsort(sizes[order, 0], kind="mergesort")]

    def filter_indices_by_size(self, indices, max_sizes):
        sizes = self.sizes
        return data_utils.filter_paired_dataset_indices_by_size(sizes[:, 0], sizes[:, 1], indices, max_sizes)
