"""``hybrid_kd``: sequence-level NLL on gold and teacher targets plus word-level KD."""

from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from fairseq_kd.criterions.kd_base import KDCriterionBase, cached_topk
from fairseq_kd.registry import register_criterion_once


@dataclass
class HybridKDConfig(FairseqDataclass):
    seq_nll_weight: float = field(default=1.0, metadata={"help": "a_seq_nll: weight of the NLL of the gold target"})
    seq_kd_weight: float = field(
        default=1.0, metadata={"help": "a_seq_kd: weight of the NLL of the teacher's target (sequence-level KD)"}
    )
    word_kd_weight: float = field(
        default=1.0, metadata={"help": "a_word_kd: weight of the word-level term T^2 * KL(q_T || p_T)"}
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
    """Hybrid knowledge distillation, the recipe of NVIDIA's NMT-distillation guide (NeMo PR #2088)::

        L = a_seq_nll * NLL(y_gold) + a_seq_kd * NLL(y_teacher) + a_word_kd * T^2 * KD
        KD = sum_t KL(q_T(.|prefix_<t, x) || p_T(.|prefix_<t, x))

    NLL(y_teacher) is Kim & Rush 2016's sequence-level KD on the teacher's beam output (from
    ``--kd-data``, ``sample["kd_target"]``); KD is Hinton et al. 2015's word-level term with the
    online teacher, on the teacher-target prefix, the gold prefix, or both (``--word-kd-prefix``);
    a --teacher-cache (built for the gold targets) serves the gold prefix.
    A term whose weight is 0 is not computed. In validation, batches without teacher targets
    (no valid split in --kd-data) get the gold-prefix terms only.
    """

    def __init__(self, task, seq_nll_weight, seq_kd_weight, word_kd_weight, word_kd_prefix, temperature,
                 kd_loss, label_smoothing, sentence_avg):
        super().__init__(task, sentence_avg, label_smoothing, temperature, kd_loss)
        weights = {"seq-nll-weight": seq_nll_weight, "seq-kd-weight": seq_kd_weight, "word-kd-weight": word_kd_weight}
        negative = [f"--{name} {w}" for name, w in weights.items() if w < 0]
        if negative or not any(weights.values()):
            raise ValueError(f"hybrid_kd weights must be >= 0 and not all 0, got {weights}")
        self.seq_nll_weight = seq_nll_weight
        self.seq_kd_weight = seq_kd_weight
        self.word_kd_weight = word_kd_weight
        self.word_kd_prefixes = ("teacher", "gold") if word_kd_prefix == "both" else (word_kd_prefix,)
        if word_kd_weight > 0:
            self.require_teacher()

    def forward(self, model, sample, reduce=True):
        log = {"ntokens": sample["ntokens"], "nsentences": sample["target"].size(0)}
        loss = 0.0
        needs_gold_pass = self.seq_nll_weight > 0 or (self.word_kd_weight > 0 and "gold" in self.word_kd_prefixes)
        needs_teacher_pass = self.seq_kd_weight > 0 or (self.word_kd_weight > 0 and "teacher" in self.word_kd_prefixes)
        if needs_teacher_pass and "kd_target" not in sample:
            if model.training:
                raise ValueError(
                    f"{self.__class__.__name__} needs the teacher's translations: pass --kd-data DIR "
                    "(fairseq-kd-distill-data output) with --kd-data-mode paired"
                )
            needs_teacher_pass, needs_gold_pass = False, True  # validation set without teacher targets

        passes = []
        if needs_gold_pass:
            passes.append(("gold", sample["net_input"], sample["target"], self.seq_nll_weight, "nll_loss"))
        if needs_teacher_pass:
            passes.append(("teacher", sample["kd_net_input"], sample["kd_target"], self.seq_kd_weight, "seq_kd_nll_loss"))
            log["kd_ntokens"] = sample["kd_ntokens"]

        kd_total, kd_positions = 0.0, 0
        for prefix, net_input, target, nll_weight, nll_key in passes:
            net_output = model(**net_input)
            with_kd = self.word_kd_weight > 0 and prefix in self.word_kd_prefixes
            cache = cached_topk(sample) if prefix == "gold" else None
            terms, pad_mask = self.student_terms(model, net_output, net_input, target, with_kd, cache)
            loss = loss + nll_weight * terms.smoothed
            log[nll_key] = terms.nll.data
            if with_kd:
                kd_total = kd_total + terms.kd
                kd_positions += int((~pad_mask).sum())
                if terms.teacher_nll is not None and prefix == "gold":
                    log["teacher_nll_loss"] = terms.teacher_nll.data
        if kd_positions:
            loss = loss + self.word_kd_weight * self.temperature**2 * kd_total
            log["kd_loss"] = kd_total.data
            log["kd_positions"] = kd_positions

        sample_size = self.sample_size(sample)
        log.update(loss=loss.data, sample_size=sample_size)
        return loss, sample_size, log
