"""``translation_distill``: fairseq's translation task plus a frozen teacher for the criterions."""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_kd.registry import register_task_once
from fairseq_kd.teacher import PRECISIONS, Teacher

logger = logging.getLogger(__name__)


@dataclass
class TranslationDistillConfig(TranslationConfig):
    teacher_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "teacher checkpoint, or several joined by ':' for an ensemble whose "
            "probabilities are averaged; its dictionaries must equal the student's"
        },
    )
    teacher_precision: ChoiceEnum(PRECISIONS) = field(
        default="auto",
        metadata={
            "help": "precision of the teacher's forward pass: auto = fp16 on CUDA, bf16 on CPUs "
            "with native bf16, else fp32; the distillation loss itself is always computed in fp32"
        },
    )
    teacher_dict_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "directory with the teacher's dict.SRC.txt/dict.TGT.txt (or dict.txt); default: "
            "the teacher checkpoint's directory, then the data directory it was trained on"
        },
    )


@register_task_once("translation_distill", dataclass=TranslationDistillConfig)
class TranslationDistillTask(TranslationTask):
    """Translation with a frozen teacher next to the student.

    The teacher is loaded when the student is built for training (so a wrong path or a dictionary
    mismatch fails before the first update), kept out of every ``nn.Module`` the trainer saves (the
    student's checkpoints hold the student alone), moved to the student's device on first use, and
    never loaded when ``fairseq-generate``/``fairseq-interactive`` rebuild the student from a
    checkpoint. Each distributed worker has its own task and so its own teacher.
    """

    cfg: TranslationDistillConfig

    def __init__(self, cfg: TranslationDistillConfig, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self._teacher = None

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if not from_checkpoint and self.cfg.teacher_path:
            self._load_teacher()
        return model

    def _load_teacher(self) -> Teacher:
        self._teacher = Teacher.load(
            self.cfg.teacher_path, self, precision=self.cfg.teacher_precision, dict_dir=self.cfg.teacher_dict_dir
        )
        return self._teacher

    def teacher(self, device: torch.device) -> Teacher:
        """The teacher on ``device``, loaded on first use (e.g. by ``fairseq-validate``)."""
        if self._teacher is None:
            if not self.cfg.teacher_path:
                raise ValueError(
                    "this criterion distils from a teacher: pass --teacher-path TEACHER.pt "
                    "(the task translation_distill loads it)"
                )
            self._load_teacher()
        return self._teacher.to(device)
