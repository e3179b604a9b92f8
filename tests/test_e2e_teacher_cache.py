"""End to end: cache the tiny teacher's top-k with fairseq-kd-cache-teacher, then distil with
word_kd from the cache alone (no teacher in the training process)."""

import subprocess

import pytest

from conftest import COMMON_TRAIN, USER_DIR, cli, run
from test_e2e_word_kd import STUDENT_ARCH, logged


@pytest.fixture(scope="module")
def cache_dir(tiny_data, tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    for split in ("train", "valid"):
        run([cli("fairseq-kd-cache-teacher"), "--teacher-path", tiny_teacher, tiny_data / "bin",
             "--split", split, "--k", "4", "--destdir", root / split, "--cpu", "--teacher-precision", "fp32"])
    return root


WORD_KD = ("--criterion", "word_kd", "--alpha", "0.5", "--temperature", "2")
TRIPLE_KD_NLL = ("--criterion", "triple_loss", "--kd-weight", "0.5", "--nll-weight", "0.5", "--cos-weight", "0",
                 "--temperature", "2")


def cached_cmd(data_bin, cache, save_dir, extra=(), criterion=WORD_KD):
    return [cli("fairseq-train"), data_bin, "--user-dir", USER_DIR, "--task", "translation_distill",
            "--teacher-cache", cache, *criterion,
            *STUDENT_ARCH, *COMMON_TRAIN, "--max-update", "120", "--save-dir", save_dir, "--no-epoch-checkpoints",
            *extra]


@pytest.mark.parametrize("criterion", [WORD_KD, TRIPLE_KD_NLL], ids=["word_kd", "triple_loss"])
def test_distilling_from_the_cache_trains_without_a_teacher(tiny_data, cache_dir, tmp_path, criterion):
    output = run(cached_cmd(tiny_data / "bin", cache_dir, tmp_path / "student", criterion=criterion))
    losses, kd = logged(output, "loss"), logged(output, "kd_loss")
    assert len(losses) >= 10
    assert losses[-1] < 0.6 * losses[0] and kd[-1] < 0.6 * kd[0], (losses, kd)
    assert "teacher on" not in output  # no online teacher was ever loaded
    assert "teacher_nll_loss" not in output
    assert (tmp_path / "student" / "checkpoint_last.pt").exists()


def test_cache_of_another_split_is_refused(tiny_data, cache_dir, tmp_path):
    # a cache directory whose "train" is really the valid split's cache: the lengths cannot match
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "train").symlink_to(cache_dir / "valid")
    (wrong / "valid").symlink_to(cache_dir / "valid")
    proc = subprocess.run([str(c) for c in cached_cmd(tiny_data / "bin", wrong, tmp_path / "s")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode != 0
    assert "teacher cache" in proc.stdout and "fairseq-kd-cache-teacher" in proc.stdout
    assert "num_updates" not in proc.stdout


def test_missing_train_cache_is_refused(tiny_data, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([str(c) for c in cached_cmd(tiny_data / "bin", tmp_path / "empty", tmp_path / "s")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode != 0
    # fairseq-train loads the validation split first: that is the one reported
    assert "no teacher cache for split 'valid'" in proc.stdout and "fairseq-kd-cache-teacher --split valid" in proc.stdout
