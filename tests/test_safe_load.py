"""Checkpoint loading stays safe: torch's ``weights_only`` unpickler stays on, the plugin's
allow-list lets fairseq checkpoints through, and a checkpoint that would run code is refused.

The allow-list is process-global, so whatever must be observed without it runs in a fresh
interpreter (the test process itself may already have imported the plugin).
"""

import argparse
import builtins
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import COMMON_TRAIN, TINY_ARCH, USER_DIR, RunsCode, cli, run

# Either one makes torch >= 2.6 ignore or force ``weights_only``; these tests run without them.
WEIGHTS_ONLY_ENV = ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")


@pytest.fixture(autouse=True)
def no_weights_only_override(monkeypatch):
    for name in WEIGHTS_ONLY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def student(tiny_data, tiny_teacher, tmp_path_factory):
    """The save dir of a student trained for 20 updates through the plugin (word_kd)."""
    save_dir = tmp_path_factory.mktemp("safe_load_student")
    run([cli("fairseq-train"), tiny_data / "bin", "--user-dir", USER_DIR, "--task", "translation_distill",
         "--teacher-path", tiny_teacher, "--criterion", "word_kd", *TINY_ARCH, *COMMON_TRAIN,
         "--max-update", "20", "--save-dir", save_dir, "--no-epoch-checkpoints"])
    return save_dir


def run_python(script: str, *args) -> str:
    """Run ``script`` in a fresh interpreter (no plugin imported, torch's default allow-list)."""
    env = {k: v for k, v in os.environ.items() if k not in WEIGHTS_ONLY_ENV}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout


@pytest.mark.parametrize(
    "payload, refusal",
    [
        # refused because builtins.exec is not on the allow-list
        (lambda marker: RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').write('ran')"),
         "GLOBAL exec was not an allowed global"),
        # refused because torch blocks the os module outright
        (lambda marker: RunsCode(os.system, f"touch '{marker}'"),
         f"GLOBAL {os.system.__module__}.system whose module"),
    ],
    ids=["exec", "os.system"],
)
def test_checkpoint_that_runs_code_is_refused(tmp_path, payload, refusal):
    import fairseq_kd  # noqa: F401  (applies the allow-list)
    from fairseq import checkpoint_utils

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    # dressed as a fairseq checkpoint: the payload hides in an allowed Namespace model config
    torch.save({"model": {}, "cfg": {"model": argparse.Namespace(arch=payload(marker))}}, path)

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed") as refused:
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert refusal in str(refused.value)
    assert not marker.exists()

    # control: the payload is live, so the refusal above is what kept it from running
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_fairseq_checkpoint_needs_the_allow_list_and_loads_with_it(tiny_teacher):
    out = run_python(
        """
        import pickle, sys
        from fairseq import checkpoint_utils

        try:
            checkpoint_utils.load_checkpoint_to_cpu(sys.argv[1])
            print("LOADED WITHOUT PLUGIN")
        except pickle.UnpicklingError as e:
            print("REFUSED WITHOUT PLUGIN:", "argparse.Namespace" in str(e))

        import fairseq_kd

        state = checkpoint_utils.load_checkpoint_to_cpu(sys.argv[1])
        print("LOADED WITH PLUGIN:", state["cfg"].model.arch, state["optimizer_history"][-1]["num_updates"])
        """,
        tiny_teacher,
    )
    assert "REFUSED WITHOUT PLUGIN: True" in out, out
    assert "LOADED WITH PLUGIN: transformer 300" in out, out


def test_allow_list_is_exactly_what_checkpoints_need(tiny_teacher, student):
    """A checkpoint file needs only ``argparse.Namespace``; the state rank 0 broadcasts on
    distributed resume needs the rest of the list. Nothing on the list is unused."""
    out = run_python(
        """
        import argparse, io, json, sys
        import torch
        from fairseq import checkpoint_utils
        from fairseq.distributed import utils as distributed_utils

        def unsafe(f):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(f))

        result = {}
        for path in sys.argv[1:]:
            in_file = unsafe(path)
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = checkpoint_utils.load_checkpoint_to_cpu(path)
            # what broadcast_object sends from rank 0: tensors split out, the rest torch.save'd
            buffer = io.BytesIO()
            torch.save(distributed_utils._split_tensors_from_obj(state, []), buffer)
            buffer.seek(0)
            result[path] = {"file": in_file, "broadcast": unsafe(buffer)}

        from fairseq_kd.safe_load import fairseq_checkpoint_globals

        result["allow_list"] = sorted(f"{g.__module__}.{g.__qualname__}" for g in fairseq_checkpoint_globals())
        print("RESULT", json.dumps(result))
        """,
        tiny_teacher, student / "checkpoint_last.pt",
    )
    result = json.loads(out.split("RESULT ", 1)[1])
    allow_list = set(result.pop("allow_list"))
    for path, needed in result.items():
        assert needed["file"] == ["argparse.Namespace"], (path, needed)
        # Namespace is allowed while the broadcast payload is scanned, so it is not listed there
        assert set(needed["broadcast"]) | {"argparse.Namespace"} == allow_list, (path, needed)


def test_train_resumes_from_checkpoint_last(tiny_data, tiny_teacher, student, tmp_path):
    save_dir = tmp_path / "resume"
    shutil.copytree(student, save_dir)
    out = run([cli("fairseq-train"), tiny_data / "bin", "--user-dir", USER_DIR, "--task", "translation_distill",
               "--teacher-path", tiny_teacher, "--criterion", "word_kd", *TINY_ARCH, *COMMON_TRAIN,
               "--max-update", "24", "--save-dir", save_dir, "--no-epoch-checkpoints"])
    assert re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch \d+ @ 20 updates\)", out), out[-3000:]
    assert re.search(r"\| train \| epoch \d+ \|.*\| num_updates 24 \|", out), out[-3000:]


def test_generate_loads_student(tiny_data, student):
    args = [tiny_data / "bin", "--path", student / "checkpoint_last.pt", "--gen-subset", "test", "--beam", "2",
            "--required-batch-size-multiple", "1", "--cpu"]
    out = run([cli("fairseq-generate"), "--user-dir", USER_DIR, *args])
    ids = sorted(int(line.split("\t", 1)[0][2:]) for line in out.splitlines() if line.startswith("H-"))
    assert ids == list(range(100)), out[-3000:]

    # control: without the plugin the same command is refused by the weights_only unpickler
    proc = subprocess.run([cli("fairseq-generate"), *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode != 0
    assert "Weights only load failed" in proc.stdout and "argparse.Namespace" in proc.stdout, proc.stdout[-3000:]


def test_interactive_loads_student(tiny_data, student):
    out = run([cli("fairseq-interactive"), tiny_data / "bin", "--user-dir", USER_DIR,
               "--path", student / "checkpoint_last.pt", "--input", tiny_data / "test.src",
               "--buffer-size", "32", "--batch-size", "32", "--beam", "2", "--cpu"])
    ids = sorted(int(line.split("\t", 1)[0][2:]) for line in out.splitlines() if line.startswith("H-"))
    assert ids == list(range(100)), out[-3000:]


def test_validate_loads_student_and_teacher(tiny_data, student):
    # the saved config names task translation_distill and criterion word_kd, so validation also
    # loads the teacher checkpoint
    out = run([cli("fairseq-validate"), tiny_data / "bin", "--user-dir", USER_DIR, "--task", "translation_distill",
               "--path", student / "checkpoint_last.pt", "--valid-subset", "valid", "--max-tokens", "2000",
               "--required-batch-size-multiple", "1", "--cpu"])
    line = re.search(r"valid on 'valid' subset \|.*", out)
    assert line, out[-3000:]
    assert "| teacher_nll_loss " in line.group(0) and "| bsz 100" in line.group(0), line.group(0)
