"""Pieces every distillation criterion shares: the student's (label-smoothed) NLL of a target, the
word-level KD term against the task's teacher, argument checks and metrics."""

import math

from fairseq import utils
from fairseq.criterions import FairseqCriterion
from fairseq.logging import metrics

from fairseq_kd import losses
from fairseq_kd.criterions.flag_checks import check_label_smoothing, check_temperature
from fairseq_kd.data.batch_keys import TEACHER_NTOKENS, TEACHER_TOPK_IDS, TEACHER_TOPK_LPROBS
from fairseq_kd.teacher import TeacherSource


def cached_topk(sample):
    """The batch's offline teacher (top-k ids, log-probs), aligned with ``sample["target"]``, if
    the task loaded a --teacher-cache for this split."""
    if TEACHER_TOPK_IDS in sample:
        return sample[TEACHER_TOPK_IDS], sample[TEACHER_TOPK_LPROBS]
    return None


def teacher_source(task) -> TeacherSource:
    """The task's :class:`~fairseq_kd.teacher.TeacherSource`; NONE for a task without a teacher
    (e.g. fairseq's plain ``translation``)."""
    return getattr(task, "teacher_source", TeacherSource.NONE)


class KDCriterionBase(FairseqCriterion):
    """Base of the distillation criterions (not registered itself).

    Losses are sums over non-pad target positions; the trainer divides them by ``sample_size``
    (gold target tokens, or sentences with ``--sentence-avg``) as for fairseq's own criterions.
    Each logged ``*_loss`` is divided by the number of positions it was summed over (see
    :attr:`LOSS_DENOMINATORS`) and reported in bits.
    """

    #: logged loss -> the logging-output key that counts the positions it sums over
    LOSS_DENOMINATORS = {
        "nll_loss": "ntokens",
        "teacher_nll_loss": "ntokens",
        "seq_kd_nll_loss": TEACHER_NTOKENS,
        "kd_loss": "kd_positions",
        "cos_loss": "cos_positions",
    }

    def __init__(self, task, sentence_avg, label_smoothing=0.0, temperature=1.0, kd_loss="kl"):
        super().__init__(task)
        check_temperature(temperature)
        check_label_smoothing(label_smoothing)
        self.sentence_avg = sentence_avg
        self.eps = label_smoothing
        self.temperature = temperature
        self.kd_kind = kd_loss  # the --kd-loss flag: "kl" or "ce"

    def require_teacher(self):
        """Fail at start-up, not at the first batch, when the task cannot provide a teacher."""
        if teacher_source(self.task) is TeacherSource.NONE:
            raise ValueError(
                f"criterion {self.__class__.__name__} distils from an online teacher: use "
                f"--task translation_distill --teacher-path TEACHER.pt (got task "
                f"{self.task.__class__.__name__} without a teacher)"
            )

    def sample_size(self, sample):
        return sample["target"].size(0) if self.sentence_avg else sample["ntokens"]

    def student_terms(self, net_output, net_input, target, with_kd=False, cached=None, teacher_outputs=None):
        """The student's losses on ``target``, each summed over its non-pad positions.

        Returns ``(losses.StudentLosses, pad mask)``. Without ``with_kd``, its KD and teacher NLL
        are None. The KD term's teacher is the offline top-k cache when ``cached`` =
        (ids, log-probs), each B x T x k and aligned with ``target`` (see
        :func:`losses.topk_teacher_distribution` for the renormalisation; a cache has no teacher
        NLL, as it does not hold every target token's probability); otherwise the task's online
        teacher, fed ``net_input``, the same source and target prefix the student saw (or its
        ``teacher_outputs`` for that input, if the caller already ran it). The student's logits
        go through one fused loss (:func:`losses.student_losses`), not through a separate
        log-softmax per term.
        """
        logits = net_output[0]
        vocab = logits.size(-1)
        pad_mask = target.eq(self.padding_idx)
        teacher = None
        if with_kd and cached is not None:
            ids, topk_lprobs = cached
            k = ids.size(-1)
            teacher = losses.topk_teacher_distribution(topk_lprobs.view(-1, k), ids.view(-1, k), self.temperature)
        elif with_kd:
            if teacher_outputs is None:
                teacher_outputs = self.teacher_outputs(net_input, logits.device)
            teacher = losses.OnlineTeacher([z.reshape(-1, vocab) for z, _ in teacher_outputs])
        # the logits are read by nothing but this loss: their memory takes their gradient
        terms = losses.student_losses(
            logits.reshape(-1, vocab), target.reshape(-1), pad_mask.view(-1), self.eps, teacher, self.temperature,
            self.kd_kind, reuse_logits=True,
        )
        return terms, pad_mask

    def teacher_outputs(self, net_input, device):
        """The online teacher's ``(logits, extra)`` per ensemble member for ``net_input``."""
        teacher = self.task.teacher(device)
        return teacher.outputs(net_input["src_tokens"], net_input["src_lengths"], net_input["prev_output_tokens"])

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """Aggregate logging outputs from data parallel training."""

        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
        for key, denominator_key in cls.LOSS_DENOMINATORS.items():
            denominator = total(denominator_key)
            if any(key in log for log in logging_outputs) and denominator > 0:
                metrics.log_scalar(key, total(key) / denominator / math.log(2), denominator, round=3)
        for key, name in (("nll_loss", "ppl"), ("teacher_nll_loss", "teacher_ppl")):
            if any(key in log for log in logging_outputs):
                metrics.log_derived(name, lambda meters, key=key: utils.get_perplexity(meters[key].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
