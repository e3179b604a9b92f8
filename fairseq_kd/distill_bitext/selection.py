"""Which of the teacher's n-best hypotheses become training pairs.

* ``top1``: the teacher's best beam hypothesis, Kim & Rush's (2016) sequence-level KD (Seq-KD).
* ``closest``: among the n-best, the hypothesis closest to the gold reference by sentence-level
  BLEU or chrF, Kim & Rush's sequence-level interpolation (Seq-Inter). It keeps the teacher's
  fluent, model-friendly output while steering away from hypotheses that drift from the
  reference. Scored on de-subworded text, as a sentence metric is meant to be computed.
* ``nbest-K``: the K best hypotheses, each as a separate pair with the same source, as in
  Gordon & Duh (2019, "Explaining Sequence-Level Knowledge Distillation as Data-Augmentation for
  Neural Machine Translation"), whose best-2 setting adds diversity to the distilled data.
"""

import argparse
import functools
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

from fairseq.data import data_utils
from sacrebleu.metrics import BLEU, CHRF

METRICS = ("bleu", "chrf")
# --subword value -> the post_process symbol fairseq uses to remove that segmentation
SUBWORD_SCHEMES = {"sentencepiece": "sentencepiece", "bpe": "subword_nmt", "none": "none"}


@dataclass(frozen=True)
class Hypothesis:
    """One teacher hypothesis.

    Attributes:
        text: the hypothesis in the target dictionary's units (subwords, as in the binarized data).
        score: fairseq's hypothesis score: the log-probability (natural log) divided by
            ``length ** lenpen``.
        rank: position in the teacher's n-best list, 0 for the best.
    """

    text: str
    score: float
    rank: int


@dataclass(frozen=True)
class Selection:
    """A parsed ``--select`` value: ``mode`` is ``top1``, ``closest`` or ``nbest``; ``k`` is the
    number of pairs it makes per source sentence."""

    mode: str
    k: int = 1

    def __str__(self):
        return f"nbest-{self.k}" if self.mode == "nbest" else self.mode


def parse_selection(value: str) -> Selection:
    """``top1`` | ``closest`` | ``nbest-K`` (K >= 1) -> :class:`Selection`; an argparse ``type``."""
    if value in ("top1", "closest"):
        return Selection(value)
    match = re.fullmatch(r"nbest-(\d+)", value)
    if match and int(match.group(1)) >= 1:
        return Selection("nbest", int(match.group(1)))
    raise argparse.ArgumentTypeError(f"expected top1, closest or nbest-K with K >= 1, got {value!r}")


def desubword(text: str, scheme: str) -> str:
    """Undo the subword segmentation ``scheme`` (a key of :data:`SUBWORD_SCHEMES`)."""
    return data_utils.post_process(text, SUBWORD_SCHEMES[scheme])


@functools.lru_cache(maxsize=None)
def _sentence_metric(metric: str):
    # the settings of sacrebleu.sentence_bleu / sentence_chrf, built once: constructing the metric
    # (and its tokenizer) on every call would cost more than scoring a short sentence
    if metric == "bleu":
        return BLEU(effective_order=True)
    if metric == "chrf":
        return CHRF()
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def sentence_similarity(hypothesis: str, reference: str, metric: str) -> float:
    """sacrebleu's sentence-level BLEU (exponential smoothing, effective order) or chrF, as
    ``sacrebleu.sentence_bleu`` and ``sacrebleu.sentence_chrf`` compute them."""
    return _sentence_metric(metric).sentence_score(hypothesis, [reference]).score


def closest_to_reference(nbest: Sequence[Hypothesis], reference: str, metric: str, subword: str) -> Hypothesis:
    """The hypothesis of ``nbest`` (best first) most similar to ``reference``; both are compared
    after :func:`desubword`. Ties go to the better-ranked hypothesis."""
    ref = desubword(reference, subword)
    similarity = [sentence_similarity(desubword(h.text, subword), ref, metric) for h in nbest]
    best = max(range(len(nbest)), key=lambda j: (similarity[j], -j))
    return nbest[best]


def select(
    nbest: Sequence[Hypothesis],
    selection: Selection,
    reference: Optional[str] = None,
    metric: str = "bleu",
    subword: str = "none",
) -> List[Hypothesis]:
    """The hypotheses of ``nbest`` (best first) that ``selection`` turns into training pairs.

    Raises ``ValueError`` when the n-best is shorter than the selection needs or ``closest`` has
    no reference: the caller would otherwise write fewer pairs than it promised.
    """
    if len(nbest) < selection.k:
        raise ValueError(f"--select {selection} needs {selection.k} hypotheses, the teacher gave {len(nbest)}")
    if selection.mode == "top1":
        return [nbest[0]]
    if selection.mode == "closest":
        if reference is None:
            raise ValueError("--select closest compares with the gold reference, but this split has no target side")
        return [closest_to_reference(nbest, reference, metric, subword)]
    return list(nbest[: selection.k])
