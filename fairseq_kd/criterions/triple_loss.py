"""``triple_loss``: DistilBERT's KD + NLL + cosine on hidden states, for translation."""

from dataclasses import dataclass, field

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from fairseq_kd import losses
from fairseq_kd.criterions.flag_checks import check_weights
from fairseq_kd.criterions.kd_base import KDCriterionBase, cached_topk, teacher_source
from fairseq_kd.hidden_states import decoder_final_states
from fairseq_kd.registry import register_criterion_once
from fairseq_kd.teacher import TeacherSource


@dataclass
class TripleLossConfig(FairseqDataclass):
    kd_weight: float = field(
        default=1.0, metadata={"help": "a_kd: weight of T^2 * KL(q_T || p_T) (or T^2 * H(q_T, p_T) with --kd-loss ce)"}
    )
    nll_weight: float = field(default=1.0, metadata={"help": "a_nll: weight of the gold NLL"})
    cos_weight: float = field(default=1.0, metadata={"help": "a_cos: weight of sum_t (1 - cos(h_s, h_t))"})
    cos_states: ChoiceEnum(["decoder", "decoder+encoder"]) = field(
        default="decoder",
        metadata={"help": "hidden states aligned by the cosine term: the decoder's final states, or "
                  "also the encoder's final states (over non-pad source positions)"},
    )
    width_mismatch: ChoiceEnum(["error", "project"]) = field(
        default="error",
        metadata={"help": "when student and teacher widths differ: error, or project the student's "
                  "states with a learned linear map (trained and saved with the student)"},
    )
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature T > 0 of the KD term"})
    kd_loss: ChoiceEnum(["kl", "ce"]) = field(
        default="kl", metadata={"help": "KD term: kl = KL(q_T || p_T), ce = H(q_T, p_T)"}
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "epsilon for label smoothing of the gold NLL"})
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion_once("triple_loss", dataclass=TripleLossConfig)
class TripleLossCriterion(KDCriterionBase):
    """DistilBERT's triple loss (Sanh et al. 2019), on a translation student::

        L = a_kd * T^2 * sum_t KL(q_T || p_T) + a_nll * NLL_eps(y_gold) + a_cos * sum_t (1 - cos(h_s,t, h_t,t))

    over non-pad target positions, h the decoder's final hidden states (the input of the output
    projection) of student and teacher on the gold prefix; with ``--cos-states decoder+encoder``
    the encoder's final states are aligned too, over non-pad source positions. The cosine term
    needs one online teacher, neither an ensemble nor a cache; with ``--cos-weight 0`` the KD term
    may come from a ``--teacher-cache``. A term whose weight is 0 is not computed
    (docs/triple-loss.md).
    """

    def __init__(self, task, kd_weight, nll_weight, cos_weight, cos_states, width_mismatch, temperature, kd_loss,
                 label_smoothing, sentence_avg):
        super().__init__(task, sentence_avg, label_smoothing, temperature, kd_loss)
        check_weights("triple_loss", {"--kd-weight": kd_weight, "--nll-weight": nll_weight,
                                      "--cos-weight": cos_weight})
        if kd_weight > 0 or cos_weight > 0:
            self.require_teacher()
        if cos_weight > 0 and teacher_source(task) is TeacherSource.CACHE:
            raise ValueError(
                "triple_loss's cosine term compares the teacher's hidden states, which a --teacher-cache "
                "does not hold: distil from the cache with --cos-weight 0 (KD + NLL), or drop --teacher-cache "
                "and pass --teacher-path"
            )
        self.kd_weight, self.nll_weight, self.cos_weight = kd_weight, nll_weight, cos_weight
        self.sides = ("decoder", "encoder") if cos_states == "decoder+encoder" else ("decoder",)
        if cos_weight > 0 and task.teacher().is_ensemble:
            raise ValueError("triple_loss aligns hidden states with one teacher: pass one --teacher-path, not an ensemble")
        self.projections = torch.nn.ModuleDict(self._projections(str(width_mismatch)) if cos_weight > 0 else {})

    def _projections(self, width_mismatch):
        """A linear map student width -> teacher width for each side whose widths differ."""
        student, teacher = self.task.student_widths, self.task.teacher_widths
        if student is None or None in [student[side] for side in self.sides] + [teacher[side] for side in self.sides]:
            raise ValueError(
                "triple_loss compares the hidden states of fairseq transformers: build the student "
                "(a transformer) with the translation_distill task before the criterion"
            )
        differing = {side: (student[side], teacher[side]) for side in self.sides if student[side] != teacher[side]}
        if differing and width_mismatch == "error":
            raise ValueError(
                f"the cosine term compares hidden states of equal width, but student and teacher differ: "
                f"{', '.join(f'{side} {s} vs {t}' for side, (s, t) in differing.items())}; use a student of the "
                "teacher's width (e.g. fairseq-kd-init-student), or --width-mismatch project to learn a linear "
                "projection, or --cos-weight 0"
            )
        return {side: torch.nn.Linear(s, t, bias=False) for side, (s, t) in differing.items()}

    def _project(self, side, states):
        return self.projections[side](states) if side in self.projections else states

    def forward(self, model, sample, reduce=True):
        net_input = sample["net_input"]
        align_encoder = self.cos_weight > 0 and "encoder" in self.sides
        student_encoder = {}
        if align_encoder:  # the student's encoder output, caught in its one forward pass
            hook = model.encoder.register_forward_hook(lambda _module, _args, out: student_encoder.update(out=out))
        try:
            net_output = model(**net_input)
        finally:
            if align_encoder:
                hook.remove()
        target = model.get_targets(sample, net_output)
        with_kd = self.kd_weight > 0
        cached = cached_topk(sample) if with_kd else None  # only with --cos-weight 0 (checked at start-up)
        needs_teacher = self.cos_weight > 0 or (with_kd and cached is None)
        teacher_outputs = self.teacher_outputs(net_input, target.device) if needs_teacher else None
        terms, pad_mask = self.student_terms(
            net_output, net_input, target, with_kd=with_kd, cached=cached, teacher_outputs=teacher_outputs
        )
        loss = self.nll_weight * terms.smoothed
        log = {"nll_loss": terms.nll.data}
        if with_kd:
            loss = loss + self.kd_weight * self.temperature**2 * terms.kd
            log.update(kd_loss=terms.kd.data, kd_positions=sample["ntokens"])
        if terms.teacher_nll is not None:
            log["teacher_nll_loss"] = terms.teacher_nll.data

        if self.cos_weight > 0:
            student_states = self._project("decoder", decoder_final_states(model, net_output[1]))
            teacher_states = self.task.teacher().decoder_states(teacher_outputs)[0]
            width = teacher_states.size(-1)
            cos_loss = losses.cosine_distance_loss(
                student_states.reshape(-1, width), teacher_states.reshape(-1, width), pad_mask.view(-1)
            )
            cos_positions = sample["ntokens"]
            if align_encoder:
                src_tokens, src_lengths = net_input["src_tokens"], net_input["src_lengths"]
                student_enc = self._project("encoder", student_encoder["out"]["encoder_out"][0].transpose(0, 1))
                teacher_enc = self.task.teacher(target.device).encoder_states(src_tokens, src_lengths)[0]
                src_pad = src_tokens.eq(self.padding_idx)
                enc_width = teacher_enc.size(-1)
                cos_loss = cos_loss + losses.cosine_distance_loss(
                    student_enc.reshape(-1, enc_width), teacher_enc.reshape(-1, enc_width), src_pad.view(-1)
                )
                cos_positions += int((~src_pad).sum())
            loss = loss + self.cos_weight * cos_loss
            log.update(cos_loss=cos_loss.data, cos_positions=cos_positions)

        sample_size = self.sample_size(sample)
        log.update(loss=loss.data, ntokens=sample["ntokens"], nsentences=sample["target"].size(0), sample_size=sample_size)
        return loss, sample_size, log
