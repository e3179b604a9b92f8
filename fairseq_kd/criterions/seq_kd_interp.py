"""``seq_kd_interp``: NLL on the gold target interpolated with NLL on the teacher's translation."""

from dataclasses import dataclass, field

from fairseq.dataclass import FairseqDataclass
from omegaconf import II

from fairseq_kd.criterions.flag_checks import check_alpha
from fairseq_kd.criterions.hybrid_kd import HybridKDCriterion
from fairseq_kd.registry import register_criterion_once


@dataclass
class SeqKDInterpConfig(FairseqDataclass):
    alpha: float = field(
        default=0.5,
        metadata={"help": "weight in [0, 1] of the teacher-target NLL: L = (1 - alpha) * NLL(y_gold) + "
                  "alpha * NLL(y_teacher); 1 = pure sequence-level KD, 0 = plain NLL"},
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "epsilon for label smoothing of both NLL terms, 0 means none"}
    )
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion_once("seq_kd_interp", dataclass=SeqKDInterpConfig)
class SeqKDInterpCriterion(HybridKDCriterion):
    """Sequence-level KD (Kim & Rush 2016) mixed with the gold NLL::

        L = (1 - alpha) * NLL_eps(y_gold) + alpha * r * NLL_eps(y_teacher),   r = |y_gold| / |y_teacher|

    each NLL summed over the batch's target tokens; with the trainer's division by the gold tokens
    |y_gold|, alpha mixes the two per-token means (see :class:`HybridKDCriterion`).

    y_teacher is the teacher's beam translation of the same source (``--kd-data`` in paired mode,
    built by ``fairseq-kd-distill-data``). No online teacher is needed. It is :class:`HybridKDCriterion`
    with a_seq_nll = 1 - alpha, a_seq_kd = alpha, a_word_kd = 0; with alpha = 0 it equals
    ``label_smoothed_cross_entropy``.
    """

    def __init__(self, task, alpha, label_smoothing, sentence_avg):
        check_alpha("alpha", alpha)
        super().__init__(
            task, seq_nll_weight=1.0 - alpha, seq_kd_weight=alpha, word_kd_weight=0.0, word_kd_prefix="teacher",
            temperature=1.0, kd_loss="kl", label_smoothing=label_smoothing, sentence_avg=sentence_avg,
        )
