"""Reuse a teacher trained elsewhere in a recipe (TEACHER=path): its sentencepiece model and its
checkpoint with its dictionary are copied into the work directory, each copy recording where it
came from (teacher.json: path, size and sha256 of the three files), and a work directory whose
recorded teacher is not the one given is refused before any step runs.

    python import_teacher.py spm --teacher CKPT --spm MODEL --dict DICT --out WORK/spm.partial
    python import_teacher.py checkpoint --teacher CKPT --spm MODEL --dict DICT --out WORK/teacher.partial
    python import_teacher.py check --teacher CKPT --spm MODEL --dict DICT --work WORK
    python import_teacher.py check --work WORK          (the recipe trains its own teacher)

The recipe binarizes the data with the teacher's dictionary (one dictionary for both languages,
as recipe_lib.sh's --joined-dictionary needs), so the students share the teacher's vocabulary.
"""

import argparse
import json
import os
import shutil
import sys

import torch
from fairseq.data import Dictionary

import fairseq_kd  # noqa: F401  (lets torch.load read fairseq checkpoints safely)
from fairseq_kd.fileio import file_sha256

RECORD = "teacher.json"
# the outputs that hold an imported file, below WORK (finished, or left by an interrupted step)
IMPORTED = ("spm", "spm.partial", "teacher", "teacher.partial")


def describe(args) -> dict:
    """Path, size and sha256 of the teacher's checkpoint, sentencepiece model and dictionary."""
    described = {}
    for role, path in (("checkpoint", args.teacher), ("spm", args.spm), ("dict", args.dict)):
        if not os.path.isfile(path):
            sys.exit(f"error: the teacher's {role} {path} does not exist (TEACHER, TEACHER_SPM, TEACHER_DICT)")
        described[role] = {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    return described


def check_vocabulary(checkpoint: str, dictionary: str) -> None:
    """Refuse a dictionary whose size is not the checkpoint's embedding rows, on either side."""
    size = len(Dictionary.load(dictionary))
    state = torch.load(checkpoint, map_location="cpu")["model"]
    for side in ("encoder", "decoder"):
        rows = state[f"{side}.embed_tokens.weight"].shape[0]
        if rows != size:
            sys.exit(
                f"error: {checkpoint}: the {side} has {rows} embeddings but {dictionary} makes a dictionary of "
                f"{size} entries: give the dictionary the teacher was trained with (TEACHER_DICT), one for both "
                "languages"
            )


def write_record(out: str, described: dict) -> None:
    with open(os.path.join(out, RECORD), "w", encoding="utf-8") as f:
        json.dump(described, f, indent=1)


def import_spm(args) -> None:
    """OUT/spm.model, the teacher's sentencepiece model (the recipe's steps read WORK/spm/spm.model)."""
    described = describe(args)
    os.makedirs(args.out)
    shutil.copyfile(args.spm, os.path.join(args.out, "spm.model"))
    write_record(args.out, described)


def import_checkpoint(args) -> None:
    """OUT/checkpoint_best.pt and OUT/dict.txt (where the plugin looks for a teacher's dictionary)."""
    described = describe(args)
    check_vocabulary(args.teacher, args.dict)
    os.makedirs(args.out)
    shutil.copyfile(args.teacher, os.path.join(args.out, "checkpoint_best.pt"))
    shutil.copyfile(args.dict, os.path.join(args.out, "dict.txt"))
    write_record(args.out, described)


def check(args) -> None:
    """Refuse WORK when what it holds came from another teacher than the one given (or from an
    imported teacher while none is given, or from the recipe's own teacher while one is given)."""
    given = describe(args) if args.teacher else None
    for name in IMPORTED:
        path = os.path.join(args.work, name)
        record = os.path.join(path, RECORD)
        if os.path.isfile(record):
            with open(record, encoding="utf-8") as f:
                recorded = json.load(f)
            if given is None:
                sys.exit(f"error: {path} comes from the teacher {recorded['checkpoint']['path']}: set TEACHER to it "
                         "to resume, or use another WORK to train the recipe's own teacher")
            changed = [role for role in given if given[role]["sha256"] != recorded[role]["sha256"]]
            if changed:
                sys.exit(f"error: {path} comes from another teacher: its {', '.join(changed)} "
                         f"({', '.join(recorded[r]['path'] for r in changed)}) differ from "
                         f"{', '.join(given[r]['path'] for r in changed)}: use another WORK, or the teacher "
                         "it was made with")
        elif given is not None and name in ("spm", "teacher") and os.path.isdir(path):
            sys.exit(f"error: {path} was made by the recipe itself, not from TEACHER={args.teacher}: use another "
                     "WORK to reuse that teacher")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, run, help_text in (
        ("spm", import_spm, "copy the teacher's sentencepiece model"),
        ("checkpoint", import_checkpoint, "copy the teacher's checkpoint and dictionary"),
        ("check", check, "refuse a work directory made with another teacher"),
    ):
        p = commands.add_parser(name, help=help_text)
        p.set_defaults(run=run)
        required = name != "check"
        p.add_argument("--teacher", required=required, help="the teacher's fairseq checkpoint")
        p.add_argument("--spm", required=required, help="the sentencepiece model its data was encoded with")
        p.add_argument("--dict", required=required, help="its fairseq dictionary (both languages)")
        if required:
            p.add_argument("--out", required=True, help="the directory to create")
        else:
            p.add_argument("--work", required=True, help="the recipe's work directory")
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
