"""``fairseq-kd-init-student``: write a shallower student checkpoint initialised from a teacher's
layers ("shrink and fine-tune", Shleifer & Rush 2020; DistilBERT's layer-sampled init).

    fairseq-kd-init-student data-bin --teacher teacher/checkpoint_best.pt \\
        --encoder-layers 3 --decoder-layers 3 --strategy spread --output student/init.pt
    fairseq-train data-bin --arch <the teacher's> --encoder-layers 3 --decoder-layers 3 ... \\
        --finetune-from-model student/init.pt

The student is the teacher's architecture with the requested depths; see
:mod:`fairseq_kd.student_init` for what is copied and how each strategy picks layers.
"""

import argparse
import os
from typing import Optional

import torch
from fairseq import models, tasks
from omegaconf import OmegaConf, open_dict

from fairseq_kd.cli.errors import UserError, run_command
from fairseq_kd.cli.inputs import add_teacher_arguments, load_teacher
from fairseq_kd.fileio import write_file
from fairseq_kd.safe_load import load_checkpoint
from fairseq_kd.student_init import (
    STRATEGIES,
    choose_layer_map,
    copy_teacher_layers,
    count_layers,
    format_layer_map,
    parse_layer_map,
    student_checkpoint,
    student_config,
)


def layer_map_argument(text: str):
    """``parse_layer_map`` for argparse, whose own message would only name the function."""
    try:
        return parse_layer_map(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-init-student",
        description="Write a student checkpoint with the teacher's architecture and fewer layers, its "
        "weights copied from the teacher: embeddings, positional embeddings, output projection and "
        "layer norms by name, each student layer from the teacher layer the strategy picks.",
    )
    parser.add_argument(
        "data",
        help="the binarized data directory the teacher's dictionaries are in (the student's training data)",
    )
    add_teacher_arguments(parser, ensemble=False)
    parser.add_argument("--output", required=True, metavar="FILE", help="where to write the student checkpoint")
    parser.add_argument(
        "--encoder-layers",
        type=int,
        metavar="N",
        help="the student's encoder layers (default: the length of --encoder-layer-map, else the teacher's)",
    )
    parser.add_argument(
        "--decoder-layers",
        type=int,
        metavar="N",
        help="the student's decoder layers (default: the length of --decoder-layer-map, else the teacher's)",
    )
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="spread",
        help="which teacher layers to copy: every-nth = layers 0, n, 2n, ... (the teacher's depth must be "
        "a multiple of the student's); spread = first and last layer, the rest evenly spaced (Shleifer & "
        "Rush 2020; 12->3 takes 0,6,11); explicit = --encoder-layer-map/--decoder-layer-map "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--encoder-layer-map",
        type=layer_map_argument,
        metavar="I,J,...",
        help="with --strategy explicit: the teacher encoder layer copied into each student encoder layer, "
        "in increasing order, e.g. 0,8,16 (default: all teacher layers)",
    )
    parser.add_argument(
        "--decoder-layer-map",
        type=layer_map_argument,
        metavar="I,J,...",
        help="with --strategy explicit: the teacher decoder layer copied into each student decoder layer, "
        "in increasing order, e.g. 0,2,5 (default: all teacher layers)",
    )
    return parser


def load_teacher_and_task(path: str, data: str, dict_dir: Optional[str] = None):
    """The teacher checkpoint's config (fairseq's, legacy ``args`` converted on loading) with
    ``data`` as the task's data directory, its task state, that task, and the teacher model, loaded
    the way every command loads it (:func:`fairseq_kd.cli.inputs.load_teacher`: its dictionaries
    must be the data's). The student keeps the teacher's config and task state."""
    state = load_checkpoint(path, "teacher checkpoint")
    cfg, task_state = state["cfg"], state.get("task_state", {})
    # the weights (and any optimizer state) are read again with the teacher: never hold both
    del state
    with open_dict(cfg):
        cfg.task.data = data
    try:
        task = tasks.setup_task(cfg.task)
    except FileNotFoundError:  # a missing dictionary: its own message names the file
        raise
    except Exception as err:  # fairseq's plain Exception: no language pair in the config or the file names
        raise UserError(f"cannot set up the teacher's task on {data} ({err}): pass the binarized data directory "
                        "the student trains on (fairseq-preprocess's output: the dictionaries and the train "
                        "split, whose file names give the language pair)") from None
    teacher = load_teacher(path, task, "fp32", dict_dir, torch.device("cpu"))
    return cfg, task_state, task, teacher.models[0]


def make_student(args: argparse.Namespace) -> dict:
    """Build the student that ``args`` describe, write its checkpoint, and return the record of
    how it was made (also stored in the checkpoint's ``extra_state["student_init"]``)."""
    if not os.path.isfile(args.teacher):
        raise UserError(f"teacher checkpoint not found: {args.teacher!r}; pass the teacher's checkpoint (--teacher)")
    if os.path.realpath(args.output) == os.path.realpath(args.teacher):
        raise UserError("--output is the teacher checkpoint itself; write the student elsewhere")
    cfg, task_state, task, teacher = load_teacher_and_task(args.teacher, args.data, args.teacher_dict_dir)
    teacher_state = teacher.state_dict()
    arch = getattr(cfg.model, "arch", None) or getattr(cfg.model, "_name", None)
    owner = f"teacher {args.teacher} (arch {arch})"
    teacher_depth = {side: count_layers(teacher_state, side, owner) for side in ("encoder", "decoder")}
    layer_maps = {
        side: choose_layer_map(
            args.strategy,
            teacher_depth[side],
            getattr(args, f"{side}_layers"),
            getattr(args, f"{side}_layer_map"),
            side,
        )
        for side in ("encoder", "decoder")
    }
    student_cfg = student_config(
        OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        len(layer_maps["encoder"]),
        len(layer_maps["decoder"]),
    )
    # built from plain containers, exactly as fairseq-generate rebuilds it from the saved config
    student = models.build_model(OmegaConf.create(student_cfg).model, task, from_checkpoint=True)
    copy_teacher_layers(student, teacher_state, layer_maps["encoder"], layer_maps["decoder"])
    record = {
        "teacher": os.path.abspath(args.teacher),
        "strategy": args.strategy,
        "teacher_encoder_layers": teacher_depth["encoder"],
        "teacher_decoder_layers": teacher_depth["decoder"],
        "encoder_layer_map": layer_maps["encoder"],
        "decoder_layer_map": layer_maps["decoder"],
    }
    checkpoint = student_checkpoint(student_cfg, student.state_dict(), task_state, record)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_file(args.output, lambda f: torch.save(checkpoint, f), binary=True)  # never seen half-written
    record["parameters"] = sum(p.numel() for p in student.parameters())
    return record


def make_student_or_fail(args: argparse.Namespace) -> dict:
    """:func:`make_student`; the problems of the user's input it meets outside this module (layer
    maps and architectures :mod:`fairseq_kd.student_init` refuses, an unreadable checkpoint, a data
    directory without dictionaries) as :class:`UserError`."""
    try:
        return make_student(args)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        raise UserError(str(err)) from None


def main(argv=None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    record = run_command(parser.prog, lambda: make_student_or_fail(args))
    print(
        f"student: {len(record['encoder_layer_map'])} encoder and {len(record['decoder_layer_map'])} decoder "
        f"layers from the teacher's {record['teacher_encoder_layers']} and {record['teacher_decoder_layers']} "
        f"(strategy {record['strategy']})"
    )
    print(f"encoder layer map: {format_layer_map(record['encoder_layer_map'])}")
    print(f"decoder layer map: {format_layer_map(record['decoder_layer_map'])}")
    print(f"wrote {args.output} ({record['parameters']:,} parameters)")


if __name__ == "__main__":
    main()
