"""``word_kd``: word-level knowledge distillation (Hinton et al. 2015; Kim & Rush 2016)."""

import math
from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from fairseq_kd import losses
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
class WordKDCriterion(FairseqCriterion):
    """Word-level KD mixed with the gold NLL, summed over non-pad target positions::

        L = (1 - alpha) * NLL_eps(y_gold) + alpha * T^2 * KD
        KD = sum_t KL(q_T(.|y_<t, x) || p_T(.|y_<t, x))      (or H(q_T, p_T) with --kd-loss ce)

    where q_T and p_T are the teacher's and student's softmax at temperature T (the T^2 factor
    keeps the gradient scale independent of T, Hinton et al. 2015). The teacher comes from the
    ``translation_distill`` task; an ensemble's probabilities are averaged. Like fairseq's own
    criterions the loss is a sum, divided by ``sample_size`` (target tokens, or sentences with
    ``--sentence-avg``) in the trainer. With alpha = 0 it equals ``label_smoothed_cross_entropy``.
    """

    def __init__(self, task, alpha, temperature, kd_loss, label_smoothing, sentence_avg):
        super().__init__(task)
        losses.check_alpha("alpha", alpha)
        losses.check_temperature(temperature)
        if not hasattr(task, "teacher"):
            raise ValueError(
                f"criterion {self.__class__.__name__} needs a teacher: use --task translation_distill "
                f"--teacher-path TEACHER.pt (got task {task.__class__.__name__})"
            )
        self.alpha = alpha
        self.temperature = temperature
        self.kd_loss = kd_loss
        self.eps = label_smoothing
        self.sentence_avg = sentence_avg

    def forward(self, model, sample, reduce=True):
        net_input = sample["net_input"]
        net_output = model(**net_input)
        target = model.get_targets(sample, net_output)
        pad_mask = target.eq(self.padding_idx)

        loss, nll_loss = self.gold_nll(model, net_output, target, pad_mask)
        kd_loss, teacher_nll = self.word_kd_term(net_output[0], net_input, target, pad_mask)
        loss = (1.0 - self.alpha) * loss + self.alpha * self.temperature**2 * kd_loss

        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "kd_loss": kd_loss.data,
            "teacher_nll_loss": teacher_nll.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        return loss, sample_size, logging_output

    def gold_nll(self, model, net_output, target, pad_mask):
        """(label-smoothed loss, plain NLL) of ``target`` under the student, summed."""
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        return losses.label_smoothed_nll_loss(
            lprobs.view(-1, lprobs.size(-1)), target.view(-1), self.eps, pad_mask.view(-1)
        )

    def word_kd_term(self, student_logits, net_input, target, pad_mask):
        """(KD summed over non-pad positions, teacher's NLL of ``target`` summed), with the teacher
        fed ``net_input``, the same source and target prefix the student saw."""
        teacher = self.task.teacher(student_logits.device)
        teacher_logits = teacher.logits(
            net_input["src_tokens"], net_input["src_lengths"], net_input["prev_output_tokens"]
        )
        flat_pad = pad_mask.view(-1)
        vocab = student_logits.size(-1)
        teacher_lprobs_t = losses.teacher_log_probs([z.view(-1, vocab) for z in teacher_logits], self.temperature)
        kd = losses.distillation_loss(
            student_logits.view(-1, vocab), teacher_lprobs_t, self.temperature, flat_pad, self.kd_loss
        )
        with torch.no_grad():
            teacher_lprobs_1 = (
                teacher_lprobs_t
                if self.temperature == 1.0
                else losses.teacher_log_probs([z.view(-1, vocab) for z in teacher_logits], 1.0)
            )
            _, teacher_nll = losses.label_smoothed_nll_loss(teacher_lprobs_1, target.view(-1), 0.0, flat_pad)
        return kd, teacher_nll

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """Aggregate logging outputs from data parallel training (losses in bits)."""

        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size = total("sample_size")
        ntokens = total("ntokens")
        metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
        for key in ("nll_loss", "kd_loss", "teacher_nll_loss"):
            metrics.log_scalar(key, total(key) / ntokens / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        metrics.log_derived("teacher_ppl", lambda meters: utils.get_perplexity(meters["teacher_nll_loss"].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
