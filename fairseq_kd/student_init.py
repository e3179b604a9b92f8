"""Initialising a shallower student from a teacher's layers ("shrink and fine-tune").

The student has the teacher's architecture and widths with fewer encoder and/or decoder layers.
Everything outside the layer stacks (token embeddings, positional embeddings, the output
projection, ``layernorm_embedding``, the final ``layer_norm`` of a pre-norm encoder/decoder) is
copied by name; student layer ``i`` of each stack is copied from teacher layer ``layer_map[i]``.
DistilBERT (Sanh et al., 2019) initialised its student from one layer out of two of BERT; Shleifer &
Rush (2020, "Pre-trained Summarization Distillation") copy maximally spaced layers of a seq2seq
teacher, keeping the first and the last, and fine-tune.

A layer map is chosen per stack by one of :data:`STRATEGIES`:

``every-nth``
    Teacher layers ``0, n, 2n, ...`` with ``n = teacher_layers / student_layers``, which must be a
    whole number: 24 -> 3 takes 0, 8, 16; 6 -> 3 takes 0, 2, 4; 6 -> 1 takes 0.
``spread``
    The first and the last teacher layer and the rest evenly spaced between them: student layer
    ``i`` of ``k`` copies teacher layer ``round(i * (n - 1) / (k - 1))`` of ``n``, ties rounded to
    the even layer; a one-layer student copies layer 0, which Shleifer & Rush found better than
    the last. 12 -> 3 takes 0, 6, 11 (their example), 6 -> 3 takes 0, 2, 5, 24 -> 3 takes 0, 12, 23.
``explicit``
    A user-given map such as ``0,8,16``: distinct teacher layers in increasing order.

This module is pure logic on models, state dicts and configs; ``fairseq-kd-init-student``
(:mod:`fairseq_kd.cli.init_student`) reads the teacher checkpoint and writes the student's.
"""

import argparse
import copy
import re
from fractions import Fraction
from typing import Dict, List, Optional, Sequence

import torch

STRATEGIES = ("every-nth", "spread", "explicit")
SIDES = ("encoder", "decoder")

_LAYER_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")


def parse_layer_map(text: str) -> List[int]:
    """``"0,8,16"`` -> ``[0, 8, 16]``."""
    try:
        return [int(index) for index in text.split(",")]
    except ValueError:
        raise ValueError(
            f"a layer map is comma-separated teacher layer indices such as 0,8,16, got {text!r}"
        ) from None


def every_nth_layers(teacher_layers: int, student_layers: int, side: str = "encoder") -> List[int]:
    """Teacher layers ``0, n, 2n, ...`` with ``n = teacher_layers // student_layers``."""
    if teacher_layers % student_layers:
        raise ValueError(
            f"every-nth cannot take {student_layers} of the teacher's {teacher_layers} {side} layers: "
            f"{teacher_layers} is not a multiple of {student_layers}. The spread strategy works for any "
            f"depth (it would take layers {format_layer_map(spread_layers(teacher_layers, student_layers))}), "
            f"or give an explicit {side} layer map"
        )
    return list(range(0, teacher_layers, teacher_layers // student_layers))


def spread_layers(teacher_layers: int, student_layers: int) -> List[int]:
    """First and last teacher layer kept, the rest evenly spaced (Shleifer & Rush, 2020).

    Layer ``i`` of ``k`` is ``round(i * (n - 1) / (k - 1))``, computed exactly and rounded half to
    even, which gives both the paper's 12 -> 3 (0, 6, 11) and the authors' code's
    6 -> 3 (0, 2, 5); ``k == 1`` gives ``[0]``.
    """
    if student_layers == 1:
        return [0]
    return [round(Fraction(i * (teacher_layers - 1), student_layers - 1)) for i in range(student_layers)]


def format_layer_map(layer_map: Sequence[int]) -> str:
    """``[0, 8, 16]`` -> ``"0,8,16"``, the form the layer-map options take."""
    return ",".join(str(index) for index in layer_map)


def choose_layer_map(
    strategy: str,
    teacher_layers: int,
    student_layers: Optional[int] = None,
    explicit: Optional[Sequence[int]] = None,
    side: str = "encoder",
) -> List[int]:
    """The teacher layer to copy into each student layer of one stack.

    Args:
        strategy: one of :data:`STRATEGIES`.
        teacher_layers: the teacher's depth on this side.
        student_layers: the student's depth; default: the length of ``explicit``, else the teacher's.
        explicit: the map for ``strategy="explicit"``; without one, the explicit strategy keeps all
            teacher layers, which needs ``student_layers`` to be unset or the teacher's depth.
        side: ``"encoder"`` or ``"decoder"``, for messages.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown layer-copying strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if explicit is not None and strategy != "explicit":
        raise ValueError(f"a {side} layer map is used by the explicit strategy only, not by {strategy}")
    if strategy == "explicit" and explicit is None:
        if student_layers not in (None, teacher_layers):
            raise ValueError(
                f"the explicit strategy needs an explicit {side} layer map: the student's {side} is to have "
                f"{student_layers} layers, the teacher's has {teacher_layers}"
            )
        explicit = range(teacher_layers)
    if student_layers is None:
        student_layers = teacher_layers if explicit is None else len(explicit)
    if student_layers < 1:
        raise ValueError(f"the student needs at least one {side} layer, got {student_layers}")
    if student_layers > teacher_layers:
        raise ValueError(
            f"the student cannot have more {side} layers ({student_layers}) than the teacher "
            f"({teacher_layers}): layer copying only removes layers"
        )
    if strategy == "every-nth":
        return every_nth_layers(teacher_layers, student_layers, side)
    if strategy == "spread":
        return spread_layers(teacher_layers, student_layers)
    layer_map = list(explicit)
    if len(layer_map) != student_layers:
        raise ValueError(
            f"the {side} layer map {format_layer_map(layer_map)} has {len(layer_map)} entries but the "
            f"student has {student_layers} {side} layers"
        )
    for index in layer_map:
        if not 0 <= index < teacher_layers:
            raise ValueError(
                f"the {side} layer map {format_layer_map(layer_map)} names teacher layer {index}, but the "
                f"teacher's {teacher_layers} {side} layers are numbered 0 to {teacher_layers - 1}"
            )
    if any(a >= b for a, b in zip(layer_map, layer_map[1:])):
        raise ValueError(
            f"the {side} layer map {format_layer_map(layer_map)} must list distinct teacher layers in "
            "increasing order (the student keeps the teacher's layer order)"
        )
    return layer_map


def count_layers(state_dict: Dict[str, torch.Tensor], side: str, owner: str) -> int:
    """The number of ``{side}.layers.<i>.*`` layers in ``state_dict``; ``owner`` names it in errors."""
    indices = {int(m.group(2)) for m in map(_LAYER_KEY.match, state_dict) if m and m.group(1) == side}
    if not indices:
        raise ValueError(
            f"{owner} has no {side}.layers.<i>.* tensors: layer copying needs an encoder-decoder model "
            f"whose {side} keeps its layers in a `layers` list, as fairseq's transformer family does "
            "(architectures such as lstm or fconv cannot be initialised this way)"
        )
    if indices != set(range(len(indices))):
        raise ValueError(f"{owner}'s {side} layers are not numbered 0 to {len(indices) - 1}: {sorted(indices)}")
    return len(indices)


def teacher_key(student_key: str, layer_maps: Dict[str, Sequence[int]]) -> str:
    """The teacher tensor a student tensor is copied from: the same name, with the layer index of
    ``{side}.layers.<i>.`` replaced by ``layer_maps[side][i]``."""
    m = _LAYER_KEY.match(student_key)
    if m is None:
        return student_key
    side, index, rest = m.group(1), int(m.group(2)), m.group(3)
    return f"{side}.layers.{layer_maps[side][index]}.{rest}"


def copy_teacher_layers(
    model: torch.nn.Module,
    teacher_state: Dict[str, torch.Tensor],
    encoder_map: Sequence[int],
    decoder_map: Sequence[int],
) -> Dict[str, str]:
    """Overwrite every parameter and buffer of ``model`` (the student) with the teacher's tensors.

    ``teacher_state`` is the ``state_dict()`` of a loaded teacher model (so legacy checkpoint keys
    are already upgraded). Each student tensor must have a teacher tensor of the same shape (see
    :func:`teacher_key`), and each teacher tensor outside the layers left out must have a place in
    the student; anything else means the architectures differ beyond depth and raises.

    Returns:
        student tensor name -> teacher tensor name, for every tensor of the student.
    """
    layer_maps = {"encoder": list(encoder_map), "decoder": list(decoder_map)}
    student_state = model.state_dict()
    for side in SIDES:
        depth = count_layers(student_state, side, "the student")
        if len(layer_maps[side]) != depth:
            raise ValueError(
                f"the {side} layer map {format_layer_map(layer_maps[side])} has {len(layer_maps[side])} "
                f"entries but the student has {depth} {side} layers"
            )
    sources = {key: teacher_key(key, layer_maps) for key in student_state}

    def left_out(key):
        m = _LAYER_KEY.match(key)
        return m is not None and int(m.group(2)) not in layer_maps[m.group(1)]

    missing = [key for key in dict.fromkeys(sources.values()) if key not in teacher_state]
    used = set(sources.values())
    unused = [key for key in teacher_state if key not in used and not left_out(key)]
    if missing or unused:
        raise ValueError(
            "the student's architecture differs from the teacher's beyond the number of layers:"
            + (f"\n  teacher tensors the student needs but the teacher lacks: {', '.join(missing[:5])}"
               if missing else "")
            + (f"\n  teacher tensors with no place in the student: {', '.join(unused[:5])}" if unused else "")
            + "\nBuild the student with the teacher's --arch and options; only --encoder-layers and "
            "--decoder-layers may differ"
        )
    mismatched = [
        f"{student} {tuple(student_state[student].shape)} vs teacher {teacher} "
        f"{tuple(teacher_state[teacher].shape)}"
        for student, teacher in sources.items()
        if student_state[student].shape != teacher_state[teacher].shape
    ]
    if mismatched:
        raise ValueError(
            "the student's widths differ from the teacher's, and copying layers needs equal widths: "
            "the same --encoder-embed-dim/--decoder-embed-dim, --encoder-ffn-embed-dim/"
            "--decoder-ffn-embed-dim and vocabularies as the teacher (only the number of layers may "
            f"differ). {len(mismatched)} tensors differ in shape, e.g.\n  " + "\n  ".join(mismatched[:5])
        )
    torch.nn.Module.load_state_dict(model, {key: teacher_state[src] for key, src in sources.items()}, strict=True)
    return sources


def init_student_from_teacher(
    model: torch.nn.Module,
    teacher_state: Dict[str, torch.Tensor],
    strategy: str,
    encoder_layer_map: Optional[str] = None,
    decoder_layer_map: Optional[str] = None,
) -> Dict[str, List[int]]:
    """Initialise a built student ``model`` from ``teacher_state`` (a loaded teacher's
    ``state_dict()``) by ``strategy``, the student's depths being those ``model`` was built with.

    ``encoder_layer_map``/``decoder_layer_map`` are the explicit strategy's maps as text
    (``"0,8,16"``). Returns the maps used, ``{"encoder": [...], "decoder": [...]}``.
    """
    explicit = {"encoder": encoder_layer_map, "decoder": decoder_layer_map}
    student_state = model.state_dict()
    layer_maps = {
        side: choose_layer_map(
            strategy,
            count_layers(teacher_state, side, "the teacher"),
            count_layers(student_state, side, "the student"),
            None if explicit[side] is None else parse_layer_map(explicit[side]),
            side,
        )
        for side in SIDES
    }
    copy_teacher_layers(model, teacher_state, layer_maps["encoder"], layer_maps["decoder"])
    return layer_maps


def student_config(teacher_cfg: dict, encoder_layers: int, decoder_layers: int) -> dict:
    """The teacher's full config (as plain containers) with the student's depths.

    Legacy ``argparse.Namespace`` sections (fairseq keeps the model's config of argparse-defined
    architectures such as ``transformer`` in one) become plain dicts, so the student checkpoint holds
    nothing beyond torch's default ``weights_only`` allow-list and loads without the plugin. Both
    flat (``encoder_layers``) and nested (``encoder.layers``) model configs are handled.
    """
    cfg = {
        section: dict(vars(value)) if isinstance(value, argparse.Namespace) else value
        for section, value in copy.deepcopy(teacher_cfg).items()
    }
    model_cfg = cfg["model"]
    arch = model_cfg.get("arch") or model_cfg.get("_name")
    for side, depth in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        found = False
        if f"{side}_layers" in model_cfg:
            model_cfg[f"{side}_layers"] = depth
            found = True
        if isinstance(model_cfg.get(side), dict) and "layers" in model_cfg[side]:
            model_cfg[side]["layers"] = depth
            found = True
        if not found:
            raise ValueError(
                f"the teacher's model config (arch {arch}) has no {side}_layers or {side}.layers "
                "setting: layer copying needs an encoder-decoder architecture with a configurable depth"
            )
    return cfg


def student_checkpoint(cfg: dict, model_state: Dict[str, torch.Tensor], task_state: dict, record: dict) -> dict:
    """A fairseq checkpoint of an untrained student: no optimizer state, zero updates, the
    training iterator at the start of epoch 1, and ``record`` (how it was made) under
    ``extra_state["student_init"]``. ``fairseq-train --finetune-from-model``, ``--restore-file``
    and ``fairseq-generate`` load it like any other checkpoint."""
    return {
        "args": None,
        "cfg": cfg,
        "model": model_state,
        "criterion": None,
        "optimizer_history": [
            {"criterion_name": None, "optimizer_name": None, "lr_scheduler_state": {}, "num_updates": 0}
        ],
        "task_state": task_state,
        "extra_state": {
            "train_iterator": {"version": 2, "epoch": 1, "iterations_in_epoch": 0, "shuffle": True},
            "student_init": record,
        },
    }
