"""The frozen teacher: loading one checkpoint or an ensemble, checking it against the student's
dictionaries, keeping it on the student's device in the requested precision, and running it.

The teacher is deliberately not an ``nn.Module`` attribute of the student model or the criterion:
fairseq saves every registered submodule of those into checkpoints, and a student checkpoint must
hold only the student. The task holds a :class:`Teacher` in a plain attribute instead.
"""

import contextlib
import enum
import logging
import os
from typing import List, Optional, Sequence

import torch
from fairseq import models
from fairseq.data import Dictionary
from fairseq.models.transformer import TransformerDecoderBase

from fairseq_kd.hidden_states import decoder_final_states
from fairseq_kd.safe_load import load_checkpoint

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def split_teacher_paths(teacher_path: str) -> List[str]:
    """``a.pt:b.pt`` -> ``["a.pt", "b.pt"]``; every file must exist. ':' always separates ensemble
    members, so a file whose own name holds ':' cannot be given: it is refused with a message that
    says so."""
    check_no_colon_in_file_name(teacher_path)
    paths = [p for p in teacher_path.split(":") if p]
    if not paths:
        raise ValueError("--teacher-path is empty: give one teacher checkpoint, or several joined by ':'")
    for i, path in enumerate(paths):
        if not os.path.isfile(path):
            member = (
                f" (member {i + 1} of {len(paths)}: ':' separates the checkpoints of an ensemble)" if len(paths) > 1 else ""
            )
            raise FileNotFoundError(
                f"teacher checkpoint not found: {path!r} (from --teacher-path {teacher_path!r}){member}; "
                "train a teacher first (e.g. fairseq-train ... --save-dir teacher) and pass its "
                "checkpoint_best.pt"
            )
    return paths


def check_no_colon_in_file_name(teacher_path: str) -> None:
    """Refuse ``--teacher-path`` naming one existing file whose name holds ':', which would be read
    as an ensemble of the pieces around each ':'."""
    if ":" in teacher_path and os.path.isfile(teacher_path):
        raise FileNotFoundError(
            f"--teacher-path {teacher_path!r}: ':' separates the checkpoints of an ensemble, so this is read "
            f"as {len([p for p in teacher_path.split(':') if p])} files, which were not found as given; the "
            "file itself exists but its path holds ':'. Rename it, or link it from a path without ':' "
            "(ln -s), and pass that path"
        )


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX)."""
    is_supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(is_supported and is_supported())


# oneDNN keeps a primitive per operand shape (1024 by default), so a bf16 teacher on CPU grows with
# every new batch shape; 16 entries hold the shapes of one forward pass (docs/performance.md).
ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 16


def bound_onednn_cache() -> None:
    """Cap oneDNN's primitive cache at :data:`ONEDNN_CACHE_CAPACITY` entries for this process,
    unless the user set ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``. oneDNN reads the variable when it
    builds its first primitive: call this before the first bf16 matrix product on CPU."""
    if ONEDNN_CACHE_VARIABLE in os.environ:
        logger.info(f"oneDNN primitive cache: {ONEDNN_CACHE_VARIABLE}={os.environ[ONEDNN_CACHE_VARIABLE]} (yours)")
        return
    os.environ[ONEDNN_CACHE_VARIABLE] = str(ONEDNN_CACHE_CAPACITY)
    logger.info(f"oneDNN primitive cache capped at {ONEDNN_CACHE_CAPACITY} entries for the bf16 teacher "
                f"(set {ONEDNN_CACHE_VARIABLE} to choose another size)")


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``auto`` to fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise; refuse fp16 on
    CPU, where half-precision matrix products are emulated and slow."""
    if precision not in PRECISIONS:
        raise ValueError(f"--teacher-precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            "--teacher-precision fp16 needs a CUDA device; on CPU use bf16 (fast on CPUs with "
            "AVX512-BF16/AMX) or fp32"
        )
    return precision


def check_same_dictionary(teacher: Dictionary, student: Dictionary, side: str, where: str, hint: str = "") -> None:
    """Raise if the teacher's and the student's dictionaries differ, showing the first differences.

    Distillation compares distributions index by index, so the two vocabularies must be the same
    symbols in the same order, not merely the same size. ``hint`` ends the message (e.g. how to name
    the teacher's own dictionaries).
    """
    if teacher.symbols == student.symbols:
        return
    diffs = [
        f"  index {i}: teacher {t!r} vs student {s!r}"
        for i, (t, s) in enumerate(zip(teacher.symbols, student.symbols))
        if t != s
    ][:5]
    if len(teacher) != len(student):
        diffs.append(f"  size: teacher {len(teacher)} vs student {len(student)} entries")
    raise ValueError(
        f"the teacher's {side} dictionary ({where}) differs from the student's:\n"
        + "\n".join(diffs)
        + "\nBinarize the student's data with the teacher's dictionaries: fairseq-preprocess "
        "--srcdict <teacher dict.SRC.txt> --tgtdict <teacher dict.TGT.txt> ..." + hint
    )


DICT_DIR_HELP = (
    "pass --teacher-dict-dir DIR with the directory holding the dict.SRC.txt/dict.TGT.txt (or one "
    "dict.txt) the teacher was trained with; for an ensemble, one directory per member, ':'-separated "
    "in --teacher-path's order (repeat a directory for members that share it: D:D)"
)


def teacher_dictionary_dirs(paths: Sequence[str], dict_dir: Optional[str]) -> List[Optional[str]]:
    """The ``--teacher-dict-dir`` entry of each teacher in ``paths`` (None: look for it, see
    :func:`find_teacher_dictionary_dir`). ``dict_dir`` holds one directory per ensemble member,
    ':'-separated; one directory is never applied to several members unless repeated, since each
    member must be checked against its own dictionaries."""
    if not dict_dir:
        return [None] * len(paths)
    dirs = [d for d in dict_dir.split(":") if d]
    if len(dirs) != len(paths):
        raise ValueError(
            f"--teacher-dict-dir {dict_dir!r} names {len(dirs)} director{'y' if len(dirs) == 1 else 'ies'} for "
            f"{len(paths)} teacher checkpoints ({':'.join(paths)}): give one directory per ensemble member, "
            "':'-separated in --teacher-path's order (repeat a directory for members that share it: D:D)"
        )
    return dirs


def find_teacher_dictionary_dir(checkpoint: str, teacher_data: Optional[str], dict_dir: Optional[str]) -> str:
    """The directory holding the teacher's dictionaries: ``dict_dir`` if given, else the
    checkpoint's own directory, else the data directory the teacher was trained on
    (``teacher_data``, its ``cfg.task.data``). A relative ``teacher_data`` is resolved against the
    checkpoint's directory (and logged), never against the current directory: a directory of that
    name there may be the student's, or another project's, and would pass the check unseen."""
    checkpoint_dir = os.path.dirname(os.path.abspath(checkpoint))
    candidates = [dict_dir] if dict_dir else [checkpoint_dir]
    data_dir = teacher_data.split(":")[0] if teacher_data and not dict_dir else None  # fairseq reads the first
    relative_data = data_dir if data_dir and not os.path.isabs(data_dir) else None
    if data_dir:
        candidates.append(os.path.join(checkpoint_dir, data_dir))  # an absolute data_dir stays as it is
    for candidate in candidates:
        if candidate and any(f.startswith("dict.") and f.endswith(".txt") for f in _listdir(candidate)):
            if relative_data and candidate != checkpoint_dir:
                logger.info(
                    f"teacher {checkpoint}: its relative data directory {relative_data!r} read from the "
                    f"checkpoint's directory: {candidate}"
                )
            return candidate
    relative = (
        f"; the teacher was trained on the relative data directory {relative_data!r}, which is not looked "
        "up in the current directory (a directory of that name there may belong to another project)"
        if relative_data else ""
    )
    raise FileNotFoundError(
        f"cannot find the dictionaries of teacher {checkpoint!r} (looked for dict.*.txt in "
        f"{[c for c in candidates if c]}){relative}: {DICT_DIR_HELP}"
    )


def _listdir(path: str) -> List[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def load_teacher_dictionary(directory: str, lang: Optional[str]) -> Dictionary:
    """``dict.<lang>.txt`` in ``directory``, or the shared ``dict.txt``."""
    per_lang = os.path.join(directory, f"dict.{lang}.txt")
    path = per_lang if lang and os.path.isfile(per_lang) else os.path.join(directory, "dict.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher dictionary not found: neither {per_lang} nor {path} exists")
    return Dictionary.load(path)


def check_teacher_dictionaries(directory: str, task, checkpoint: Optional[str] = None) -> None:
    """Refuse a teacher whose dictionaries (in ``directory``) differ from ``task``'s, both sides."""
    owner = f" of teacher {checkpoint}" if checkpoint else ""
    hint = f"\nIf {directory} does not hold the dictionaries{owner}, {DICT_DIR_HELP}"
    for side, lang, student_dict in (
        ("source", task.cfg.source_lang, task.source_dictionary),
        ("target", task.cfg.target_lang, task.target_dictionary),
    ):
        check_same_dictionary(
            load_teacher_dictionary(directory, lang), student_dict, side, f"{directory}{owner}", hint
        )


class TeacherSource(str, enum.Enum):
    """Where a task takes the teacher's distribution from during training."""

    ONLINE = "online"  # a teacher in memory, run on every batch
    CACHE = "cache"  # its stored top-k (--teacher-cache); no teacher in memory
    NONE = "none"


class Teacher:
    """One frozen translation model, or an ensemble of them, that produces logits for a batch.

    Args:
        models: fairseq encoder-decoder models with the student's vocabulary.
        precision: one of :data:`PRECISIONS`; resolved against the device in :meth:`to`.
    """

    def __init__(self, models: Sequence[torch.nn.Module], precision: str = "auto"):
        self.models = list(models)
        self.precision = str(precision)  # fairseq passes its ChoiceEnum members
        self.resolved_precision = None
        self.device = None
        for model in self.models:
            model.eval()
            model.requires_grad_(False)

    @property
    def is_ensemble(self) -> bool:
        return len(self.models) > 1

    @classmethod
    def load(cls, teacher_path: str, task, precision: str = "auto", dict_dir: Optional[str] = None) -> "Teacher":
        """Load the checkpoint(s) in ``teacher_path`` (``:``-separated) for ``task``'s student.

        Each teacher's dictionaries must equal the task's (``dict_dir``: one directory per
        member, ':'-separated, see :func:`teacher_dictionary_dirs`); its architecture comes from its
        own checkpoint.
        """
        resolve_precision(precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        loaded = []
        paths = split_teacher_paths(teacher_path)
        for path, member_dict_dir in zip(paths, teacher_dictionary_dirs(paths, dict_dir)):
            state = load_checkpoint(path, "teacher checkpoint")
            cfg = state["cfg"]
            directory = find_teacher_dictionary_dir(path, cfg.task.get("data"), member_dict_dir)
            check_teacher_dictionaries(directory, task, path)
            model = models.build_model(cfg.model, task, from_checkpoint=True)
            model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
            n_params = sum(p.numel() for p in model.parameters())
            logger.info(f"teacher {path}: {model.__class__.__name__}, {n_params:,} parameters")
            loaded.append(model)
        return cls(loaded, precision)

    def to(self, device: torch.device) -> "Teacher":
        """Move the teacher to ``device`` (a no-op when it is already there) in its precision."""
        if self.device == device:
            return self
        self.resolved_precision = resolve_precision(self.precision, device)
        # On CUDA the weights themselves are cast; on CPU bf16 runs under autocast with fp32 weights
        # (layer norms and softmax stay in fp32 there).
        dtype = _DTYPES[self.resolved_precision] if device.type == "cuda" else torch.float32
        for model in self.models:
            model.to(device=device, dtype=dtype)
        if device.type == "cpu" and self.resolved_precision == "bf16":
            bound_onednn_cache()
        self.device = device
        logger.info(f"teacher on {device} in {self.resolved_precision}")
        return self

    def _precision_context(self):
        if self.device.type == "cpu" and self.resolved_precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        if self.device.type in ("cpu", "cuda"):
            # The weights already have the teacher's precision: an autocast region opened around the
            # criterion (fairseq's --amp) must not recast the teacher's matmuls to its own dtype.
            return torch.autocast(self.device.type, enabled=False)
        return contextlib.nullcontext()

    @torch.no_grad()
    def outputs(self, src_tokens, src_lengths, prev_output_tokens) -> List[tuple]:
        """Each teacher's ``(logits (B, T, V), extra)`` for teacher-forced ``prev_output_tokens``;
        ``extra["inner_states"]`` holds the decoder's layer outputs."""
        with self._precision_context():
            return [_forward(model, src_tokens, src_lengths, prev_output_tokens) for model in self.models]

    def logits(self, src_tokens, src_lengths, prev_output_tokens) -> List[torch.Tensor]:
        """Each teacher's output logits, (B, T, V), for teacher-forced ``prev_output_tokens``."""
        return [logits for logits, _ in self.outputs(src_tokens, src_lengths, prev_output_tokens)]

    def decoder_states(self, outputs: Sequence[tuple]) -> List[torch.Tensor]:
        """Each teacher's final decoder states, (B, T, C), from its :meth:`outputs`."""
        return [decoder_final_states(model, extra) for model, (_, extra) in zip(self.models, outputs)]

    @torch.no_grad()
    def encoder_states(self, src_tokens, src_lengths) -> List[torch.Tensor]:
        """Each teacher's final encoder states, (B, S, C)."""
        with self._precision_context():
            return [model.encoder(src_tokens, src_lengths=src_lengths)["encoder_out"][0].transpose(0, 1) for model in self.models]


def _forward(model, src_tokens, src_lengths, prev_output_tokens):
    """``model``'s (logits, extra). For fairseq transformers the output projection is applied to a
    contiguous copy of the decoder's features (a transposed view), which CPU bf16 autocast
    multiplies much faster (docs/performance.md). Same logits."""
    if not isinstance(model.decoder, TransformerDecoderBase):
        return model(src_tokens=src_tokens, src_lengths=src_lengths, prev_output_tokens=prev_output_tokens)
    features, extra = model(
        src_tokens=src_tokens, src_lengths=src_lengths, prev_output_tokens=prev_output_tokens, features_only=True
    )
    return model.decoder.output_layer(features.contiguous()), extra
