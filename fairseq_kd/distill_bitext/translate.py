"""Translate sentences of a binarized split, by id, with the teacher: the batching every engine
shares (:class:`SplitTranslator`) and the fairseq engine, fairseq's own generator.

The teacher runs through ``task.build_generator`` and ``task.inference_step``, the same
``SequenceGenerator`` beam search that ``fairseq-generate`` uses, in-process. Unlike
``fairseq-generate``, which drops the last batch when its size is not a multiple of
``--required-batch-size-multiple`` and silently skips sentences longer than the model accepts
unless told otherwise, every requested id either comes back translated or is named as too long
(an error unless skipping was asked for), and batches are built from the requested ids only, in a
fixed order (source length, then target length, then id), so that a shard translates the same
way wherever and whenever it runs.
"""

import types
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from fairseq import utils
from fairseq.dataclass.configs import GenerationConfig

from fairseq_kd.distill_bitext.selection import Hypothesis
from fairseq_kd.distill_bitext.shards import DistillDataError


class SplitTranslator:
    """Translates chosen sentences of a loaded split, batch by batch, whatever the decoder.

    Batches are built from the requested ids only, in a fixed order (source length, then target
    length, then id), so that a shard translates the same way wherever and whenever it runs, and
    with the same composition for every engine (fairseq's length limit depends on the batch).
    Subclasses decode the batches in :meth:`translate_batches`.

    Args:
        task: a translation task with ``split`` loaded (:func:`fairseq_kd.cli.inputs.load_split`).
        max_tokens, batch_size: batch limits (either may be None, not both).
        max_source_positions: the longest source (units, with EOS) the teacher accepts.
        skip_too_long: return sentences longer than that as skipped instead of raising.
    """

    def __init__(self, task, split: str, max_tokens: Optional[int], batch_size: Optional[int],
                 max_source_positions: int, skip_too_long: bool = False):
        if max_tokens is None and batch_size is None:
            raise DistillDataError("give --max-tokens or --batch-size (or both)")
        self.task, self.dataset = task, task.dataset(split)
        self.max_tokens, self.batch_size, self.skip_too_long = max_tokens, batch_size, skip_too_long
        self.max_source_positions = max_source_positions
        too_long = np.flatnonzero(self.dataset.src_sizes > self.max_source_positions)
        if len(too_long) and not skip_too_long:  # the whole split, before any shard is saved
            raise self.too_long_error(too_long.tolist())

    def too_long_error(self, ids: Sequence[int]) -> DistillDataError:
        return DistillDataError(
            f"{len(ids)} source sentences (ids {ids[:10]}) are longer than the teacher's "
            f"{self.max_source_positions} positions; pass --skip-too-long to leave them out (counted "
            "in the summary) or remove them from the data"
        )

    def source_text(self, i: int) -> str:
        """Sentence ``i``'s source as the binarized data holds it (units of the source dictionary)."""
        return self.task.source_dictionary.string(self.dataset.src[i])

    def reference_text(self, i: int) -> str:
        return self.task.target_dictionary.string(self.dataset.tgt[i])

    def _batches(self, ids: Sequence[int]) -> List[np.ndarray]:
        src_sizes = self.dataset.src_sizes
        tgt_sizes = self.dataset.tgt_sizes
        order = sorted(ids, key=lambda i: (src_sizes[i], tgt_sizes[i] if tgt_sizes is not None else 0, i))
        return self.dataset.batch_by_size(
            np.array(order, dtype=np.int64), max_tokens=self.max_tokens, max_sentences=self.batch_size,
            required_batch_size_multiple=1,
        )

    def translate_batches(self, batches: List[np.ndarray]) -> Iterator[Dict[int, List[Hypothesis]]]:
        """For each batch in turn, the n-best list (best first) of every sentence id in it."""
        raise NotImplementedError

    def translate(self, ids: Sequence[int], on_batch=None) -> Tuple[Dict[int, List[Hypothesis]], List[int]]:
        """The n-best list (best first) of every sentence in ``ids`` that fits the teacher, and
        the ids that do not fit (empty unless ``skip_too_long``). ``on_batch(n)`` is called
        after each batch of ``n`` sentences."""
        too_long = [i for i in ids if self.dataset.src_sizes[i] > self.max_source_positions]
        if too_long and not self.skip_too_long:
            raise self.too_long_error(too_long)
        skip = set(too_long)
        hypotheses = {}
        batches = self._batches([i for i in ids if i not in skip])
        for batch, batch_hypotheses in zip(batches, self.translate_batches(batches)):
            hypotheses.update(batch_hypotheses)
            if on_batch is not None:
                on_batch(len(batch))
        return hypotheses, too_long


class TeacherTranslator(SplitTranslator):
    """Beam search with fairseq's ``SequenceGenerator`` over chosen sentences of a loaded split.

    Args:
        task: a translation task with ``split`` loaded (:func:`fairseq_kd.cli.inputs.load_split`).
        models: the teacher ensemble (:attr:`fairseq_kd.teacher.Teacher.models`), already on ``device``.
        gen_cfg: fairseq's generation settings (beam, nbest, max_len_a/b, lenpen, ...).
        max_tokens, batch_size, skip_too_long: as for :class:`SplitTranslator`.
    """

    def __init__(self, task, split: str, models, gen_cfg: GenerationConfig, max_tokens: Optional[int],
                 batch_size: Optional[int], device: torch.device, skip_too_long: bool = False):
        max_source_positions = utils.resolve_max_positions(
            task.max_positions(), *[m.max_positions() for m in models]
        )[0]
        super().__init__(task, split, max_tokens, batch_size, max_source_positions, skip_too_long)
        self.models, self.gen_cfg, self.device = models, gen_cfg, device
        for model in models:
            # Teacher freezes its parameters (requires_grad False). On CPU with torch 2.13, F.linear on a 3-D
            # input is several times slower with such a weight than with one that requires grad (measured:
            # 320x1x256 @ 8000x256, 1 thread, 270 ms vs 40 ms; 2-D inputs are not affected), and every linear
            # layer of the decoder gets a 3-D input: beam search ran at half fairseq-generate's speed.
            # Generation runs under torch.no_grad (task.inference_step), so no graph is built either way.
            model.requires_grad_(True)
            model.prepare_for_inference_(types.SimpleNamespace(generation=gen_cfg))
        self.generator = task.build_generator(models, gen_cfg)

    def translate_batches(self, batches: List[np.ndarray]) -> Iterator[Dict[int, List[Hypothesis]]]:
        for batch in batches:
            yield self._translate_batch(batch)

    @torch.no_grad()
    def _translate_batch(self, batch: np.ndarray) -> Dict[int, List[Hypothesis]]:
        sample = self.dataset.collater([self.dataset[i] for i in batch])
        if self.device.type == "cuda":
            sample = utils.move_to_cuda(sample, device=self.device)
        outputs = self.task.inference_step(self.generator, self.models, sample)
        tgt_dict = self.task.target_dictionary
        strip = self.generator.symbols_to_strip_from_output
        return {
            sample_id: [
                Hypothesis(tgt_dict.string(h["tokens"].int().cpu(), extra_symbols_to_ignore=strip),
                           float(h["score"]), rank)
                for rank, h in enumerate(nbest[: self.gen_cfg.nbest])
            ]
            for sample_id, nbest in zip(sample["id"].tolist(), outputs)
        }
