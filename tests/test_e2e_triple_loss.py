"""End to end: a 6x6 teacher, a 3x3 student initialised from its layers (the console script, and
the task option), trained with triple_loss through fairseq-train."""

import re
import subprocess

import pytest

from conftest import COMMON_TRAIN, USER_DIR, cli, run
from test_e2e_word_kd import logged

WIDTH = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]


@pytest.fixture(scope="module")
def deep_teacher(tiny_data, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("teacher6x6")
    run([cli("fairseq-train"), tiny_data / "bin", *WIDTH, "--encoder-layers", "6", "--decoder-layers", "6",
         *COMMON_TRAIN, "--criterion", "label_smoothed_cross_entropy", "--max-update", "150",
         "--save-dir", save_dir, "--no-epoch-checkpoints"])
    return save_dir / "checkpoint_best.pt"


def triple_cmd(data_bin, teacher, save_dir, *extra):
    return [cli("fairseq-train"), data_bin, "--user-dir", USER_DIR, "--task", "translation_distill",
            "--teacher-path", teacher, "--teacher-precision", "fp32", "--criterion", "triple_loss",
            "--kd-weight", "1", "--nll-weight", "1", "--cos-weight", "1", "--temperature", "2",
            *WIDTH, "--encoder-layers", "3", "--decoder-layers", "3", *COMMON_TRAIN,
            "--max-update", "40", "--save-dir", save_dir, "--no-epoch-checkpoints", *extra]


def first_cos_loss(output):
    return float(re.search(r"\| train_inner \|.*? cos_loss=([\d.]+)", output).group(1))


def test_layer_sampled_student_trains_with_triple_loss(tiny_data, deep_teacher, tmp_path):
    init = tmp_path / "init.pt"
    printed = run([cli("fairseq-kd-init-student"), tiny_data / "bin", "--teacher", deep_teacher,
                   "--encoder-layers", "3", "--decoder-layers", "3", "--strategy", "spread", "--output", init])
    assert "encoder layer map: 0,2,5" in printed and "decoder layer map: 0,2,5" in printed

    copied = run(triple_cmd(tiny_data / "bin", deep_teacher, tmp_path / "copied", "--finetune-from-model", init,
                            "--log-interval", "1"))
    scratch = run(triple_cmd(tiny_data / "bin", deep_teacher, tmp_path / "scratch", "--log-interval", "1"))
    losses = logged(copied, "loss")
    assert losses[-1] < losses[0], losses
    for key in ("kd_loss", "nll_loss", "cos_loss"):
        assert logged(copied, key), key  # each term is logged on its own
    # copied layers start with hidden states much closer to the teacher's than a random student
    assert first_cos_loss(copied) < 0.5 * first_cos_loss(scratch), (first_cos_loss(copied), first_cos_loss(scratch))


def test_task_option_initialises_the_student(tiny_data, deep_teacher, tmp_path):
    output = run(triple_cmd(tiny_data / "bin", deep_teacher, tmp_path / "s", "--student-init", "every-nth",
                            "--max-update", "5"))
    assert "student initialised from the teacher's layers (every-nth): encoder [0, 2, 4], decoder [0, 2, 4]" in output


def test_bad_layer_map_is_refused_before_training(tiny_data, deep_teacher, tmp_path):
    cmd = triple_cmd(tiny_data / "bin", deep_teacher, tmp_path / "s", "--student-init", "explicit",
                     "--student-encoder-layer-map", "0,3,9", "--student-decoder-layer-map", "0,1,2")
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode != 0 and "num_updates" not in proc.stdout
    assert "names teacher layer 9, but the teacher's 6 encoder layers are numbered 0 to 5" in proc.stdout
