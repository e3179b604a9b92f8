"""``word_kd``: word-level knowledge distillation (Hinton et al. 2015; Kim & Rush 2016)."""

from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from fairseq_kd.criterions.flag_checks import check_alpha
from fairseq_kd.criterions.kd_base import KDCriterionBase, cached_topk
from fairseq_kd.registry import register_criterion_once


@dataclass
class WordKDConfig(FairseqDataclass):
    alpha: float = field(
        default=0.5,
        metadata={"help": "weight of the distillation term in [0, 1]: L = (1 - alpha) * NLL + alpha * T^2 * KD"},
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "softmax temperature T > 0 applied to teacher and student logits in the KD term"},
    )
    kd_loss: ChoiceEnum(["kl", "ce"]) = field(
        default="kl",
        metadata={"help": "KD term: kl = KL(q_T || p_T), ce = cross-entropy H(q_T, p_T) (same gradient)"},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "epsilon for label smoothing of the gold NLL term, 0 means none"},
    )
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion_once("word_kd", dataclass=WordKDConfig)
class WordKDCriterion(KDCriterionBase):
    """Word-level KD mixed with the gold NLL, summed over non-pad target positions::

        L = (1 - alpha) * NLL_eps(y_gold) + alpha * T^2 * KD
        KD = sum_t KL(q_T(.|y_<t, x) || p_T(.|y_<t, x))      (or H(q_T, p_T) with --kd-loss ce)

    where q_T and p_T are the teacher's and student's softmax at temperature T (the T^2 factor
    keeps the gradient scale independent of T, Hinton et al. 2015). The teacher comes from the
    ``translation_distill`` task: online (an ensemble's probabilities are averaged), or its offline
    top-k cache (``--teacher-cache``). Like fairseq's own
    criterions the loss is a sum, divided by ``sample_size`` (target tokens, or sentences with
    ``--sentence-avg``) in the trainer. With alpha = 0 it equals ``label_smoothed_cross_entropy``.
    """

    def __init__(self, task, alpha, temperature, kd_loss, label_smoothing, sentence_avg):
        super().__init__(task, sentence_avg, label_smoothing, temperature, kd_loss)
        check_alpha("alpha", alpha)
        self.require_teacher()
        self.alpha = alpha

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)
        terms, _ = self.student_terms(net_output, sample["net_input"], target, with_kd=True, cached=cached_topk(sample))
        loss = (1.0 - self.alpha) * terms.smoothed + self.alpha * self.temperature**2 * terms.kd

        sample_size = self.sample_size(sample)
        logging_output = {
            "loss": loss.data,
            "nll_loss": terms.nll.data,
            "kd_loss": terms.kd.data,
            "ntokens": sample["ntokens"],
            "kd_positions": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        if terms.teacher_nll is not None:
            logging_output["teacher_nll_loss"] = terms.teacher_nll.data
        return loss, sample_size, logging_output
