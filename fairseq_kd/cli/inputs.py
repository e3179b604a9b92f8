"""What the ``fairseq-kd-*`` commands read, taken the same way by each of them: the teacher (its
options, with one help text per flag, and its loading) and a split of a binarized data directory.
Every problem with them is a :class:`~fairseq_kd.cli.errors.UserError` naming the file or flag."""

import argparse

import torch
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_kd.cli.errors import UserError
from fairseq_kd.distill_bitext.binarize import empty_binarized_files
from fairseq_kd.teacher import PRECISIONS, Teacher


def add_teacher_arguments(parser: argparse.ArgumentParser, ensemble: bool = True, precision: bool = False) -> None:
    """The teacher's options: ``--teacher-path`` (one checkpoint or an ensemble; ``--teacher``, one
    checkpoint, where ``ensemble`` is False), ``--teacher-dict-dir`` and, if ``precision``,
    ``--teacher-precision``. ``parser`` may be an argument group."""
    if ensemble:
        parser.add_argument("--teacher-path", required=True,
                            help="teacher checkpoint, or several joined by ':' for an ensemble whose probabilities "
                            "are averaged; its dictionaries must equal DATA's")
    else:
        parser.add_argument("--teacher", required=True, metavar="CHECKPOINT", help="the teacher's fairseq checkpoint")
    parser.add_argument("--teacher-dict-dir", default=None, metavar="DIR",
                        help="directory with the teacher's dict.SRC.txt/dict.TGT.txt (or dict.txt), checked against "
                        "DATA's; for an ensemble one per checkpoint, ':'-separated. Default: the checkpoint's "
                        "directory, then the data directory it was trained on (a relative one is looked up next to "
                        "the checkpoint, never in the current directory)")
    if precision:
        parser.add_argument("--teacher-precision", choices=PRECISIONS, default="auto",
                            help="precision of the teacher's forward pass: auto = fp16 on CUDA, bf16 on CPUs with "
                            "native bf16, else fp32; log-softmax and top-k are in fp32 (default: auto)")


def add_cpu_argument(parser: argparse.ArgumentParser) -> None:
    """``--cpu``: the teacher runs on the CPU although a GPU is there."""
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")


def teacher_device(args: argparse.Namespace) -> torch.device:
    """CUDA when available, unless ``--cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def load_teacher(teacher_path: str, task, precision: str, dict_dir, device: torch.device) -> Teacher:
    """The teacher of ``teacher_path`` (``a.pt:b.pt``: an ensemble) for ``task``'s data, on ``device``
    in ``precision``, through :meth:`fairseq_kd.teacher.Teacher.load`: safe unpickling, and each
    member's dictionaries checked to be the data's. A missing checkpoint or dictionary, other
    dictionaries than the data's or a precision the device lacks is a :class:`UserError`."""
    try:
        return Teacher.load(teacher_path, task, precision, dict_dir).to(device)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        raise UserError(str(err)) from err


def load_split(data: str, split: str, source_lang, target_lang) -> TranslationTask:
    """A translation task over the binarized ``data`` directory with ``split`` loaded as
    fairseq-train loads it; the language pair is inferred from the file names when not given.

    The training split (``train``) is loaded with ``combine=True``, as fairseq-train loads it: with
    the continuation files ``train1``, ``train2``, ... where the directory has them (without them
    the dataset is the same). What a tool makes from a split must hold every sentence the student
    trains on, under fairseq-train's sentence ids: a teacher cache is looked up by those ids, and a
    distilled ``train`` that left ``train1`` out would drop its sentences silently. Other splits are
    loaded alone, as fairseq-train loads validation splits (``combine=False``).
    """
    # the fields fairseq fills from its global config by interpolation, set to fairseq's defaults
    cfg = TranslationConfig(data=data, source_lang=source_lang, target_lang=target_lang, dataset_impl=None,
                            train_subset="train", required_seq_len_multiple=1)
    try:
        task = TranslationTask.setup_task(cfg)
    except Exception as err:  # FileNotFoundError for a missing dictionary, plain Exception for an unknown pair
        raise UserError(f"cannot load split {split!r} of {data}: {err}") from err
    # fairseq cannot open a split with no sentences (it cannot map an empty file): say so first
    empty = empty_binarized_files(data, split, task.cfg.source_lang, task.cfg.target_lang)
    if empty:
        raise UserError(f"split {split!r} of {data} has no sentences ({empty[0]} is empty); pass a split that "
                        "has some (--split)")
    try:
        task.load_dataset(split, combine=split == cfg.train_subset)
    except Exception as err:  # FileNotFoundError for a missing split
        raise UserError(f"cannot load split {split!r} of {data}: {err}") from err
    return task
