"""Shared fixtures: a tiny synthetic translation task, binarized, and a tiny teacher trained on it
through the real fairseq CLIs (built once per test session, in a temporary directory)."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_kd")
BIN = Path(sys.executable).parent

# A small transformer that learns the synthetic task in a few hundred CPU updates.
TINY_ARCH = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]
COMMON_TRAIN = [
    "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "2000", "--cpu",
    "--required-batch-size-multiple", "1", "--no-progress-bar", "--log-format", "simple",
    "--log-interval", "10", "--seed", "1", "--num-workers", "0", "--dropout", "0.0",
    # no background prefetch thread: when training stops mid-epoch, fairseq's daemon thread can
    # still be collating batches while the interpreter exits, which aborts the process (SIGABRT)
    "--data-buffer-size", "0",
]


def cli(name: str) -> str:
    """Path of a console script installed next to the running interpreter."""
    return str(BIN / name)


def run(cmd, cwd=None, env=None, timeout=600):
    """Run a CLI, return its combined output; fail the test with the output if it fails."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-6000:]}")
    return proc.stdout


class RunsCode:
    """Unpickles into a call of ``func(*args)``: what a malicious checkpoint would smuggle in."""

    def __init__(self, func, *args):
        self.func = func
        self.args = args

    def __reduce__(self):
        return self.func, self.args


def synthetic_pairs(n: int, seed: int):
    """Source: random words a0..a19; target: the source reversed, each aK written bK."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = [f"a{rng.randrange(20)}" for _ in range(rng.randint(3, 9))]
        pairs.append((" ".join(words), " ".join("b" + w[1:] for w in reversed(words))))
    return pairs


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors and models, where a second intra-op thread only
    adds synchronisation cost (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Binarized synthetic src->tgt data with one joined dictionary: train 2000, valid/test 100."""
    root = tmp_path_factory.mktemp("tiny_data")
    for split, n, seed in (("train", 2000, 1), ("valid", 100, 2), ("test", 100, 3)):
        pairs = synthetic_pairs(n, seed)
        (root / f"{split}.src").write_text("".join(s + "\n" for s, _ in pairs))
        (root / f"{split}.tgt").write_text("".join(t + "\n" for _, t in pairs))
    run([cli("fairseq-preprocess"), "-s", "src", "-t", "tgt", "--joined-dictionary",
         "--trainpref", root / "train", "--validpref", root / "valid", "--testpref", root / "test",
         "--destdir", root / "bin", "--workers", "1"])
    return root


@pytest.fixture(scope="session")
def tiny_teacher(tiny_data, tmp_path_factory):
    """A teacher trained for 300 updates with label-smoothed cross-entropy; its checkpoint path."""
    save_dir = tmp_path_factory.mktemp("teacher")
    run([cli("fairseq-train"), tiny_data / "bin", "--task", "translation", *TINY_ARCH, *COMMON_TRAIN,
         "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
         "--max-update", "300", "--save-dir", save_dir, "--no-epoch-checkpoints"])
    return save_dir / "checkpoint_best.pt"


def empty_split_data(tiny_data, directory, split):
    """A binarized data directory with the tiny data's dictionaries and an empty ``split``."""
    from fairseq.data import indexed_dataset

    directory.mkdir()
    for lang in ("src", "tgt"):
        shutil.copyfile(tiny_data / "bin" / f"dict.{lang}.txt", directory / f"dict.{lang}.txt")
        builder = indexed_dataset.make_builder(str(directory / f"{split}.src-tgt.{lang}.bin"), impl="mmap",
                                               vocab_size=100)
        builder.finalize(str(directory / f"{split}.src-tgt.{lang}.idx"))  # no sentences
    return directory


# The slow marker (pytest.ini): `make test-fast` runs `pytest -m "not slow"`. The test files that
# train, distil or translate through fairseq's command-line tools, or run whole recipes and
# scripts, take from 20 s to minutes each; they are marked here by file name (test_recipes.py and
# test_gpu_check.py mark their own).
SLOW_TEST_FILES = {
    "test_distributed.py",       # two-process training through torchrun
    "test_ct2_export.py",        # the rest train the session's tiny teacher or another, through fairseq-train
    "test_distill_data.py",
    "test_distill_data_ct2.py",
    "test_safe_load.py",
    "test_student_init.py",
    "test_teacher_cache.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name.startswith("test_e2e_") or item.path.name in SLOW_TEST_FILES:
            item.add_marker(pytest.mark.slow)
