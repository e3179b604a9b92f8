"""word_kd under 2-process data-parallel training on CPU (gloo, launched by torchrun): one job,
a teacher in every worker, and resume from ``checkpoint_last.pt``.

fairseq lowers the root logger of every rank but 0 to WARNING, so worker 1 never shows the
plugin's INFO lines. The first run therefore goes through a small launcher that calls
``fairseq-train``'s own entry point after keeping the ``fairseq_kd`` loggers at INFO, and torchrun
``--tee`` prefixes each worker's lines with ``[default<rank>]:``.
"""

import re
import shutil
from collections import defaultdict

import pytest

from conftest import COMMON_TRAIN, TINY_ARCH, USER_DIR, cli, run

DISTRIBUTED = [
    "--distributed-world-size", "2", "--distributed-backend", "gloo", "--distributed-init-method", "env://",
    "--distributed-no-spawn", "--distributed-rank", "-1", "--ddp-backend", "legacy_ddp",
]
MAX_TOKENS = int(COMMON_TRAIN[COMMON_TRAIN.index("--max-tokens") + 1])

LAUNCHER = """\
import logging
import sys

from fairseq_cli.train import cli_main

logging.getLogger("fairseq_kd").setLevel(logging.INFO)
sys.exit(cli_main())
"""


def torchrun_train(script, data, teacher, save_dir, max_update, log_dir):
    """Run ``script`` (fairseq-train or a launcher) as 2 workers of one word_kd job."""
    return run([cli("torchrun"), "--standalone", "--nproc_per_node", "2", "--tee", "3", "--log-dir", log_dir,
                script, data / "bin", "--user-dir", USER_DIR, "--task", "translation_distill",
                "--teacher-path", teacher, "--criterion", "word_kd", *TINY_ARCH, *COMMON_TRAIN, *DISTRIBUTED,
                "--max-update", max_update, "--save-dir", save_dir, "--no-epoch-checkpoints"])


def lines_by_rank(output):
    """{rank: [lines]} from torchrun's ``[default<rank>]:`` prefixes."""
    by_rank = defaultdict(list)
    for line in output.splitlines():
        match = re.match(r"\[default(\d+)\]:(.*)", line)
        if match:
            by_rank[int(match.group(1))].append(match.group(2))
    return by_rank


def epoch_stats(lines):
    """[{stat: value}] of the ``| train | epoch N |`` summary lines, in order."""
    stats = []
    for line in lines:
        if "| train | epoch" in line:
            fields = (f.strip().split(" ", 1) for f in line.split("| train | ", 1)[1].split("|"))
            stats.append({key: value for key, value in fields})
    return stats


@pytest.fixture(scope="module")
def distributed_run(tiny_data, tiny_teacher, tmp_path_factory):
    """(output, save dir) of 20 updates of word_kd on 2 workers."""
    root = tmp_path_factory.mktemp("distributed")
    launcher = root / "train.py"
    launcher.write_text(LAUNCHER)
    save_dir = root / "checkpoints"
    output = torchrun_train(launcher, tiny_data, tiny_teacher, save_dir, 20, root / "logs")
    return output, save_dir


def test_word_kd_trains_as_one_job_with_a_teacher_per_worker(distributed_run):
    output, _ = distributed_run
    by_rank = lines_by_rank(output)
    assert sorted(by_rank) == [0, 1], output[-3000:]

    # one job: rank 0 reports for both workers, rank 1 reports nothing of its own
    assert any("training on 2 devices" in line for line in by_rank[0]), output[-3000:]
    assert epoch_stats(by_rank[1]) == []
    stats = epoch_stats(by_rank[0])
    assert len(stats) >= 3, output[-3000:]
    # a worker's batch holds at most --max-tokens target words, so more words per update means
    # the logged (all-reduced) update combines both workers' batches
    assert all(float(epoch["wpb"]) > MAX_TOKENS for epoch in stats), stats

    # each worker loads its own teacher and runs it in its training steps
    for rank in (0, 1):
        loaded = [line for line in by_rank[rank] if re.search(r"fairseq_kd\.teacher \| teacher \S+: ", line)]
        used = [line for line in by_rank[rank] if "fairseq_kd.teacher | teacher on cpu" in line]
        assert len(loaded) == 1 and len(used) == 1, (rank, by_rank[rank][-50:])

    assert float(stats[-1]["loss"]) < float(stats[0]["loss"]) - 0.5, stats
    assert stats[-1]["num_updates"] == "20", stats


def test_resume_from_checkpoint_last_on_two_workers(distributed_run, tiny_data, tiny_teacher, tmp_path):
    """Rank 0 reads checkpoint_last.pt and broadcasts it; rank 1 unpickles it under
    ``weights_only``, which needs the plugin's allow-list beyond ``argparse.Namespace``."""
    _, trained = distributed_run
    save_dir = tmp_path / "checkpoints"
    shutil.copytree(trained, save_dir)
    output = torchrun_train(cli("fairseq-train"), tiny_data, tiny_teacher, save_dir, 28, tmp_path / "logs")

    rank0 = lines_by_rank(output)[0]
    assert any(re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch \d+ @ 20 updates\)", line)
               for line in rank0), output[-3000:]
    updates = [int(epoch["num_updates"]) for epoch in epoch_stats(rank0)]
    assert updates and min(updates) > 20 and updates[-1] == 28, updates
