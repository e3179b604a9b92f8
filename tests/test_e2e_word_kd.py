"""End to end through the real CLIs: distil a student from the tiny teacher with word_kd, resume
it, translate with the student alone, and refuse bad teachers before training starts."""

import re
import shutil
import subprocess

import pytest
import torch

import fairseq_kd  # noqa: F401  (lets torch.load read fairseq checkpoints safely)
from conftest import COMMON_TRAIN, USER_DIR, cli, run

STUDENT_ARCH = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]


def distil_cmd(data_bin, teacher, save_dir, max_update, extra=()):
    return [
        cli("fairseq-train"), data_bin, "--user-dir", USER_DIR, "--task", "translation_distill",
        "--teacher-path", teacher, "--teacher-precision", "fp32", "--criterion", "word_kd",
        "--alpha", "0.5", "--temperature", "2", *STUDENT_ARCH, *COMMON_TRAIN,
        "--max-update", str(max_update), "--save-dir", save_dir, "--no-epoch-checkpoints", *extra,
    ]


def logged(output, key):
    """Per-epoch training values of ``key`` in a fairseq log."""
    values = []
    for line in re.findall(r"\| train \| epoch \d+ (\|.*)", output):
        fields = dict(f.strip().split(" ", 1) for f in line.split("|") if f.strip())
        values.append(float(fields[key]))
    return values


@pytest.fixture(scope="module")
def distilled(tiny_data, tiny_teacher, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("student")
    output = run(distil_cmd(tiny_data / "bin", tiny_teacher, save_dir, 120))
    return save_dir, output


def test_word_kd_training_lowers_the_loss(distilled):
    _, output = distilled
    losses, kd_losses = logged(output, "loss"), logged(output, "kd_loss")
    teacher_nll = logged(output, "teacher_nll_loss")
    assert len(losses) >= 10  # one per epoch
    assert losses[-1] < 0.6 * losses[0], losses
    assert kd_losses[-1] < 0.6 * kd_losses[0], kd_losses
    # the frozen teacher's own loss on the gold data does not train away: it stays low throughout
    assert max(teacher_nll) < min(logged(output, "nll_loss")), (teacher_nll, logged(output, "nll_loss"))


def test_checkpoint_holds_only_the_student(distilled, tiny_teacher):
    save_dir, _ = distilled
    student = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")
    teacher = torch.load(tiny_teacher, map_location="cpu")
    keys = set(student["model"])
    assert not [k for k in keys if "teacher" in k]
    assert not [k for k in student.get("criterion") or {} if "teacher" in k]
    # the student's parameters have the student's shapes, not the (wider) teacher's
    assert student["model"]["encoder.embed_tokens.weight"].shape[1] == 32
    assert teacher["model"]["encoder.embed_tokens.weight"].shape[1] == 64
    n_student = sum(t.numel() for t in student["model"].values())
    n_teacher = sum(t.numel() for t in teacher["model"].values())
    assert n_student < n_teacher / 2


def test_generate_with_the_student_translates_every_sentence(distilled, tiny_data):
    save_dir, _ = distilled
    output = run([
        cli("fairseq-generate"), tiny_data / "bin", "--user-dir", USER_DIR, "--task", "translation_distill",
        "--path", save_dir / "checkpoint_best.pt", "--gen-subset", "test", "--beam", "2",
        "--batch-size", "16", "--required-batch-size-multiple", "1", "--cpu",
    ])
    hypothesis_ids = sorted(int(m) for m in re.findall(r"^H-(\d+)\t", output, flags=re.M))
    n_test = len((tiny_data / "test.src").read_text().splitlines())
    assert hypothesis_ids == list(range(n_test))
    # the teacher is never loaded for generation
    assert "teacher on" not in output


def test_resume_from_checkpoint_last(distilled, tiny_data, tiny_teacher, tmp_path):
    save_dir, _ = distilled
    resumed = tmp_path / "resumed"
    shutil.copytree(save_dir, resumed)
    output = run(distil_cmd(tiny_data / "bin", tiny_teacher, resumed, 140))
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 120 updates\)", output), output[-3000:]
    assert "num_updates 140" in output or "num_updates=140" in output
    state = torch.load(resumed / "checkpoint_last.pt", map_location="cpu")
    assert state["optimizer_history"][-1]["num_updates"] == 140


def train_fails(cmd):
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "num_updates" not in proc.stdout  # refused before the first update
    return proc.stdout


def test_missing_teacher_is_refused_before_training(tiny_data, tmp_path):
    output = train_fails(distil_cmd(tiny_data / "bin", tmp_path / "nope.pt", tmp_path / "s", 5))
    assert "teacher checkpoint not found" in output and "nope.pt" in output


def test_teacher_with_another_dictionary_is_refused(tiny_data, tiny_teacher, tmp_path):
    # the teacher's checkpoint directory carries a dictionary with two entries swapped
    other = tmp_path / "other_teacher"
    other.mkdir()
    shutil.copy(tiny_teacher, other / "teacher.pt")
    lines = (tiny_data / "bin" / "dict.src.txt").read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    (other / "dict.txt").write_text("\n".join(lines) + "\n")
    output = train_fails(distil_cmd(tiny_data / "bin", other / "teacher.pt", tmp_path / "s", 5))
    assert "dictionary" in output and "differs from the student's" in output
    assert "index 4" in output  # the first four entries are fairseq's specials
    assert "--srcdict" in output  # says how to fix it


@pytest.mark.parametrize("flag,value,message", [
    ("--alpha", "1.5", "--alpha must lie in [0, 1]"),
    ("--temperature", "0", "--temperature must be > 0"),
])
def test_bad_hyperparameters_are_refused(tiny_data, tiny_teacher, tmp_path, flag, value, message):
    cmd = distil_cmd(tiny_data / "bin", tiny_teacher, tmp_path / "s", 5)
    cmd[cmd.index(flag) + 1] = value
    assert message in train_fails(cmd)
