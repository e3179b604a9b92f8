"""``hybrid_kd``: sequence-level NLL on gold and teacher targets plus word-level KD."""

from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from fairseq_kd.criterions.flag_checks import check_weights
from fairseq_kd.criterions.kd_base import KDCriterionBase, cached_topk, teacher_source
from fairseq_kd.data.batch_keys import TEACHER_NET_INPUT, TEACHER_NTOKENS, TEACHER_TARGET
from fairseq_kd.registry import register_criterion_once
from fairseq_kd.teacher import TeacherSource


@dataclass
class HybridKDConfig(FairseqDataclass):
    seq_nll_weight: float = field(default=1.0, metadata={"help": "a_seq_nll: weight of the NLL of the gold target"})
    seq_kd_weight: float = field(
        default=1.0, metadata={"help": "a_seq_kd: weight of the NLL of the teacher's target (sequence-level KD)"}
    )
    word_kd_weight: float = field(
        default=1.0,
        metadata={"help": "a_word_kd: weight of the word-level term T^2 * KL(q_T || p_T) (or T^2 * H(q_T, p_T) "
                  "with --kd-loss ce)"},
    )
    word_kd_prefix: ChoiceEnum(["teacher", "gold", "both"]) = field(
        default="teacher",
        metadata={"help": "target prefix the word-level term is computed on: the teacher's translation, "
                  "the gold reference, or both (summed)"},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature T > 0 of the word-level term"}
    )
    kd_loss: ChoiceEnum(["kl", "ce"]) = field(
        default="kl", metadata={"help": "word-level term: kl = KL(q_T || p_T), ce = H(q_T, p_T)"}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "epsilon for label smoothing of both NLL terms, 0 means none"}
    )
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion_once("hybrid_kd", dataclass=HybridKDConfig)
class HybridKDCriterion(KDCriterionBase):
    """Hybrid knowledge distillation: Kim & Rush 2016's sequence-level and word-level KD together
    with the gold NLL, the combination NVIDIA's NMT-distillation guide recommends (NeMo PR #2088)::

        L = a_seq_nll * NLL_eps(y_gold) + a_seq_kd * r * NLL_eps(y_teacher) + a_word_kd * T^2 * KD
        KD = sum_t KL(q_T(.|prefix_<t, x) || p_T(.|prefix_<t, x))     (--kd-loss ce: H(q_T, p_T))
        r = |y_gold| / |y_teacher|   (1 with --sentence-avg)

    each term summed over its target's tokens, KD over the positions of its prefix (times r on the
    teacher's), so that after the trainer's division by |y_gold| the weights mix per-token means.
    y_teacher is the teacher's translation (``--kd-data`` in paired mode); KD (Hinton et al. 2015)
    is taken on the teacher-target prefix, the gold prefix or both (``--word-kd-prefix``). A term
    whose weight is 0 is not computed in training; validation always logs the gold ``nll_loss``
    (docs/seq-kd.md).
    """

    def __init__(self, task, seq_nll_weight, seq_kd_weight, word_kd_weight, word_kd_prefix, temperature,
                 kd_loss, label_smoothing, sentence_avg):
        super().__init__(task, sentence_avg, label_smoothing, temperature, kd_loss)
        check_weights("hybrid_kd", {
            "--seq-nll-weight": seq_nll_weight, "--seq-kd-weight": seq_kd_weight, "--word-kd-weight": word_kd_weight,
        })
        self.seq_nll_weight = seq_nll_weight
        self.seq_kd_weight = seq_kd_weight
        self.word_kd_weight = word_kd_weight
        self.word_kd_prefixes = ("teacher", "gold") if word_kd_prefix == "both" else (word_kd_prefix,)
        if word_kd_weight > 0:
            self.require_teacher()
        self.uses_teacher_targets = seq_kd_weight > 0 or (word_kd_weight > 0 and "teacher" in self.word_kd_prefixes)
        if self.uses_teacher_targets:
            self.require_teacher_targets()

    def require_teacher_targets(self):
        """Fail at start-up when the task will not pair each gold target with the teacher's."""
        if getattr(self.task, "pairs_teacher_targets", False):
            return
        hint = (
            "; a --teacher-cache holds the teacher for the gold targets only: with it, use "
            "--seq-kd-weight 0 --word-kd-prefix gold (or word_kd)"
            if teacher_source(self.task) is TeacherSource.CACHE else ""
        )
        raise ValueError(
            f"criterion {self.__class__.__name__} trains on the teacher's translations next to the gold "
            "targets: use --task translation_distill --kd-data DIR (fairseq-kd-distill-data output) "
            f"--kd-data-mode paired{hint}"
        )

    def forward(self, model, sample, reduce=True):
        log = {"ntokens": sample["ntokens"], "nsentences": sample["target"].size(0)}
        loss = 0.0
        # validation always runs the gold pass: its nll_loss is the metric comparable across criterions
        needs_gold_pass = (
            not model.training or self.seq_nll_weight > 0
            or (self.word_kd_weight > 0 and "gold" in self.word_kd_prefixes)
        )
        needs_teacher_pass, gold_weight = self.uses_teacher_targets, self.seq_nll_weight
        if needs_teacher_pass and TEACHER_TARGET not in sample:
            if model.training:
                raise ValueError(
                    f"{self.__class__.__name__} needs the teacher's translations: pass --kd-data DIR "
                    "(fairseq-kd-distill-data output) with --kd-data-mode paired"
                )
            # a validation set without teacher targets: the gold target stands in for the teacher's
            needs_teacher_pass, gold_weight = False, self.seq_nll_weight + self.seq_kd_weight

        passes = []
        if needs_gold_pass:
            passes.append(("gold", sample["net_input"], sample["target"], gold_weight, "nll_loss"))
        if needs_teacher_pass:
            passes.append(
                ("teacher", sample[TEACHER_NET_INPUT], sample[TEACHER_TARGET], self.seq_kd_weight, "seq_kd_nll_loss")
            )
            log[TEACHER_NTOKENS] = sample[TEACHER_NTOKENS]

        kd_weighted, kd_total, kd_positions = 0.0, 0.0, 0
        for prefix, net_input, target, nll_weight, nll_key in passes:
            net_output = model(**net_input)
            with_kd = self.word_kd_weight > 0 and prefix in self.word_kd_prefixes
            cache = cached_topk(sample) if prefix == "gold" else None
            terms, pad_mask = self.student_terms(net_output, net_input, target, with_kd, cache)
            r = 1.0 if prefix == "gold" or self.sentence_avg else sample["ntokens"] / sample[TEACHER_NTOKENS]
            loss = loss + nll_weight * r * terms.smoothed
            log[nll_key] = terms.nll.data
            if with_kd:
                kd_weighted = kd_weighted + r * terms.kd
                kd_total = kd_total + terms.kd
                kd_positions += int((~pad_mask).sum())
                if terms.teacher_nll is not None and prefix == "gold":
                    log["teacher_nll_loss"] = terms.teacher_nll.data
        if kd_positions:
            loss = loss + self.word_kd_weight * self.temperature**2 * kd_weighted
            log["kd_loss"] = kd_total.data
            log["kd_positions"] = kd_positions

        sample_size = self.sample_size(sample)
        log.update(loss=loss.data, sample_size=sample_size)
        return loss, sample_size, log
