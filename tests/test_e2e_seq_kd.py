"""End to end: teacher translations with fairseq-kd-distill-data, then fairseq-train with
seq_kd_interp and hybrid_kd (paired), and the data-level mixes (concat, ratio, gold fraction)."""

import re
import subprocess

import pytest

from conftest import COMMON_TRAIN, USER_DIR, cli, run
from test_e2e_word_kd import STUDENT_ARCH, logged


@pytest.fixture(scope="module")
def kd_bin(tiny_data, tiny_teacher, tmp_path_factory):
    dest = tmp_path_factory.mktemp("kd") / "kd-bin"
    for split in ("train", "valid"):
        run([cli("fairseq-kd-distill-data"), tiny_data / "bin", "--teacher-path", tiny_teacher, "--split", split,
             "--destdir", dest, "--beam", "2", "--cpu"])
    return dest


def train_cmd(data_bin, save_dir, *flags, max_update=60):
    return [cli("fairseq-train"), data_bin, "--user-dir", USER_DIR, "--task", "translation_distill",
            *STUDENT_ARCH, *COMMON_TRAIN, "--max-update", str(max_update), "--save-dir", save_dir,
            "--no-epoch-checkpoints", *flags]


def test_seq_kd_interp_trains_on_paired_teacher_targets(tiny_data, kd_bin, tmp_path):
    output = run(train_cmd(tiny_data / "bin", tmp_path / "s", "--kd-data", kd_bin, "--criterion", "seq_kd_interp",
                           "--alpha", "0.5"))
    losses, seq_kd = logged(output, "loss"), logged(output, "seq_kd_nll_loss")
    assert losses[-1] < 0.7 * losses[0], losses
    assert seq_kd and seq_kd[-1] < seq_kd[0]
    assert "teacher on" not in output  # no online teacher needed


def test_hybrid_kd_logs_every_term(tiny_data, tiny_teacher, kd_bin, tmp_path):
    output = run(train_cmd(tiny_data / "bin", tmp_path / "s", "--kd-data", kd_bin, "--teacher-path", tiny_teacher,
                           "--teacher-precision", "fp32", "--criterion", "hybrid_kd", "--word-kd-prefix", "both",
                           "--temperature", "1"))
    for key in ("nll_loss", "seq_kd_nll_loss", "kd_loss", "teacher_nll_loss"):
        values = logged(output, key)
        assert values and values[-1] < values[0] or key == "teacher_nll_loss", (key, values)
    assert logged(output, "loss")[-1] < logged(output, "loss")[0]


@pytest.mark.parametrize("flags, epoch_pairs", [
    (["--kd-data-mode", "concat"], 4000),                                                   # 2000 gold + 2000 teacher
    (["--kd-data-mode", "ratio", "--mix-ratios", "1:2", "--gold-fraction", "0.05"], 2100),   # 100 gold + 2000 teacher
    (["--kd-data-mode", "ratio", "--mix-ratios", "0.34:0.66", "--mix-epoch-size", "1000"], 1000),
])
def test_data_level_mixing(tiny_data, kd_bin, tmp_path, flags, epoch_pairs):
    output = run(train_cmd(tiny_data / "bin", tmp_path / "s", "--kd-data", kd_bin, *flags,
                           "--criterion", "label_smoothed_cross_entropy", max_update=10))
    match = re.search(r"train: (concat|ratio) of (\d+) \+ (\d+) pairs .*?-> (\d+) per epoch", output)
    assert match, output[-2000:]
    assert int(match.group(4)) == epoch_pairs
    if "--gold-fraction" in flags:
        assert (int(match.group(2)), int(match.group(3))) == (100, 2000)


def test_ratio_mix_is_deterministic_per_seed(tiny_data, kd_bin, tmp_path):
    def epoch_ids(seed, epoch):
        task = setup_distill_task(tiny_data, "--kd-data", kd_bin, "--kd-data-mode", "ratio", "--mix-ratios", "1:2",
                                  "--mix-epoch-size", "300", "--seed", seed)
        task.load_dataset("train", epoch=epoch)
        dataset = task.dataset("train")
        dataset.set_epoch(epoch)
        return [tuple(dataset[i]["target"].tolist()) for i in range(len(dataset))]

    first = epoch_ids(1, 1)
    assert len(first) == 300
    assert first == epoch_ids(1, 1)
    assert first != epoch_ids(2, 1)
    assert first != epoch_ids(1, 2)


def setup_distill_task(tiny_data, *flags):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = [str(tiny_data / "bin"), "--user-dir", USER_DIR, "--task", "translation_distill", *map(str, flags),
            "--arch", "transformer", "--criterion", "label_smoothed_cross_entropy"]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    return tasks.setup_task(cfg.task)


def test_ratio_mix_takes_a_source_of_exactly_its_share_whole(tiny_data, kd_bin):
    """1:1 of 2000 gold and 2000 teacher pairs in 4000 per epoch: every pair once, none repeated."""
    task = setup_distill_task(tiny_data, "--kd-data", kd_bin, "--kd-data-mode", "ratio", "--mix-ratios", "1:1")
    task.load_dataset("train")
    mixed = task.dataset("train")
    mixed.set_epoch(1)
    pairs = sorted((tuple(mixed[i]["source"].tolist()), tuple(mixed[i]["target"].tolist())) for i in range(len(mixed)))
    gold_task = setup_distill_task(tiny_data)
    gold_task.load_dataset("train")
    sources = (gold_task.dataset("train"), gold_task._load_pairs(str(kd_bin), "train"))
    expected = sorted(
        (tuple(d[i]["source"].tolist()), tuple(d[i]["target"].tolist())) for d in sources for i in range(len(d))
    )
    assert len(pairs) == 4000 and pairs == expected


@pytest.mark.parametrize("flags, named", [
    (["--kd-data-mode", "ratio", "--mix-ratios", "1:2"], "--kd-data-mode, --mix-ratios"),
    (["--gold-fraction", "0.05"], "--gold-fraction"),
    (["--extra-data", "bt-bin"], "--extra-data"),
])
def test_mixing_flags_without_kd_data_are_refused(tiny_data, flags, named):
    with pytest.raises(ValueError, match=re.escape(named) + r" mix the gold pairs .* pass --kd-data DIR"):
        setup_distill_task(tiny_data, *flags)


def test_negative_mix_epoch_size_is_refused(tiny_data, kd_bin):
    with pytest.raises(ValueError, match="--mix-epoch-size must be >= 0"):
        setup_distill_task(tiny_data, "--kd-data", kd_bin, "--kd-data-mode", "ratio", "--mix-ratios", "1:2",
                           "--mix-epoch-size", "-5")


def binarize_pairs(tiny_data, pairs, dest):
    """Binarize ``pairs`` as the train split of ``dest`` with the tiny data's dictionaries."""
    dest.mkdir()
    (dest / "raw.src").write_text("".join(p[0] + "\n" for p in pairs))
    (dest / "raw.tgt").write_text("".join(p[1] + "\n" for p in pairs))
    d = tiny_data / "bin" / "dict.src.txt"
    run([cli("fairseq-preprocess"), "-s", "src", "-t", "tgt", "--trainpref", dest / "raw", "--destdir", dest,
         "--srcdict", d, "--tgtdict", tiny_data / "bin" / "dict.tgt.txt", "--workers", "1"])
    return dest


@pytest.mark.parametrize("change, message", [
    ("drop_last", "1999 teacher pairs for 2000 gold pairs"),
    ("swap_two", "the source of sentence id 0 differs"),
])
def test_misaligned_teacher_targets_are_refused(tiny_data, tmp_path, change, message):
    src = (tiny_data / "train.src").read_text().splitlines()
    tgt = (tiny_data / "train.tgt").read_text().splitlines()
    pairs = list(zip(src, tgt))
    pairs = pairs[:-1] if change == "drop_last" else [pairs[1], pairs[0]] + pairs[2:]
    bad = binarize_pairs(tiny_data, pairs, tmp_path / "bad")
    proc = subprocess.run(
        [str(c) for c in train_cmd(tiny_data / "bin", tmp_path / "s", "--kd-data", bad,
                                   "--criterion", "seq_kd_interp", "--alpha", "0.5")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode != 0 and "num_updates" not in proc.stdout
    assert "teacher targets are misaligned" in proc.stdout and message in proc.stdout, proc.stdout[-1500:]
    assert "fairseq-kd-distill-data" in proc.stdout  # says how to fix it
