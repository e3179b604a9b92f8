"""Bad input and faults on the training and checkpoint side (docs/troubleshooting.md, "Bad input
and faults: training and checkpoints"): one test per row of that table. Teachers are untrained
checkpoints written by fairseq's Trainer; nothing here trains."""

import contextlib
import logging
import os
import re
import shutil
import signal

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import fairseq_kd  # noqa: F401  (safe loading of fairseq checkpoints)
from conftest import TINY_ARCH, USER_DIR
from fairseq_kd.cli.init_student import main as init_student_main
from fairseq_kd.safe_load import CONFIG_MAX_DEPTH, CONFIG_MAX_NODES, CheckpointError, check_config_size
from fairseq_kd.teacher import Teacher
from test_e2e_seq_kd import setup_distill_task
from test_student_init import save_untrained_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tiny_data, tmp_path_factory):
    """An untrained teacher with the tiny data's dictionaries (its cfg.task.data is absolute)."""
    return save_untrained_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pt", tiny_data / "bin", TINY_ARCH, 1)


@pytest.fixture(scope="module")
def student_task(tiny_data):
    return setup_distill_task(tiny_data)


def training_config(tiny_data, *flags):
    """fairseq-train's config for the tiny data with the plugin's task and ``flags``."""
    argv = [str(tiny_data / "bin"), "--user-dir", USER_DIR, "--task", "translation_distill", *map(str, flags)]
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))


def permuted_dictionary_dir(tiny_data, directory):
    """``directory`` with the tiny data's joined dictionary, entries 0 and 1 swapped (index 4 and 5)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = (tiny_data / "bin" / "dict.src.txt").read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    (directory / "dict.txt").write_text("\n".join(lines) + "\n")
    return directory


# --------------------------------------------------------------------- the dictionary check


def test_one_dict_dir_for_an_ensemble_is_refused(tiny_data, teacher, student_task, tmp_path):
    """a.pt:b.pt --teacher-dict-dir A used to check both members against A."""
    good = tiny_data / "bin"
    permuted = permuted_dictionary_dir(tiny_data, tmp_path / "b")
    ensemble = f"{teacher}:{teacher}"
    with pytest.raises(ValueError, match=r"names 1 directory for 2 teacher checkpoints.*one directory per ensemble member"):
        Teacher.load(ensemble, student_task, "fp32", dict_dir=str(good))
    # one directory per member: the second member's own dictionary is checked, and named
    with pytest.raises(ValueError, match=r"(?s)source dictionary \(.*/b of teacher .*teacher\.pt\) differs.*index 4") as err:
        Teacher.load(ensemble, student_task, "fp32", dict_dir=f"{good}:{permuted}")
    assert "--teacher-dict-dir" in str(err.value)
    # a directory shared by the members is repeated, explicitly
    assert len(Teacher.load(ensemble, student_task, "fp32", dict_dir=f"{good}:{good}").models) == 2


def test_relative_teacher_data_is_not_read_from_the_current_directory(tiny_data, student_task, tmp_path, monkeypatch):
    """A teacher trained on a relative data dir "bin" elsewhere: the student's own "bin" in the
    current directory used to stand in for the teacher's dictionaries."""
    monkeypatch.chdir(tiny_data)  # the student's project: ./bin holds the student's dictionaries
    foreign = tmp_path / "other_project" / "checkpoints"
    foreign.mkdir(parents=True)
    checkpoint = save_untrained_checkpoint(foreign / "teacher.pt", "bin", TINY_ARCH, 2)
    assert torch.load(checkpoint)["cfg"]["task"]["data"] == "bin"
    with pytest.raises(FileNotFoundError, match=r"relative data directory 'bin', which is not looked up in the "
                       r"current directory.*pass --teacher-dict-dir DIR"):
        Teacher.load(str(checkpoint), student_task, "fp32")
    # resolved against the checkpoint's directory instead, and said so
    permuted_dictionary_dir(tiny_data, foreign / "bin")
    with pytest.raises(ValueError, match=r"(?s)other_project/checkpoints/bin of teacher .*differs from the student's"):
        Teacher.load(str(checkpoint), student_task, "fp32")


def test_relative_teacher_data_next_to_the_checkpoint_is_used_and_logged(tiny_data, student_task, tmp_path, caplog,
                                                                        monkeypatch):
    monkeypatch.chdir(tiny_data)
    project = tmp_path / "teacher_project"
    project.mkdir()
    checkpoint = save_untrained_checkpoint(project / "teacher.pt", "bin", TINY_ARCH, 3)
    shutil.copytree(tiny_data / "bin", project / "bin", ignore=shutil.ignore_patterns("*.bin", "*.idx"))  # dicts only
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="fairseq_kd.teacher"):
        Teacher.load(str(checkpoint), student_task, "fp32")
    assert f"relative data directory 'bin' read from the checkpoint's directory: {project / 'bin'}" in caplog.text


# --------------------------------------------------------------------- non-finite values


FINITE = "must be a finite number, got"


@pytest.mark.parametrize("criterion, flags, message", [
    ("word_kd", ["--temperature", "inf"], f"--temperature {FINITE} inf"),
    ("word_kd", ["--alpha", "nan"], r"--alpha must lie in \[0, 1\].*got nan"),  # refused before too: kept
    ("word_kd", ["--label-smoothing", "nan"], f"--label-smoothing {FINITE} nan"),
    ("hybrid_kd", ["--word-kd-weight", "nan"], f"--word-kd-weight {FINITE} nan"),
    ("hybrid_kd", ["--seq-nll-weight", "inf"], f"--seq-nll-weight {FINITE} inf"),
    ("hybrid_kd", ["--seq-kd-weight=-inf"], f"--seq-kd-weight {FINITE} -inf"),
    ("hybrid_kd", ["--temperature", "inf"], f"--temperature {FINITE} inf"),
    ("seq_kd_interp", ["--alpha", "inf"], r"--alpha must lie in \[0, 1\].*got inf"),  # refused before too: kept
    ("seq_kd_interp", ["--label-smoothing", "inf"], f"--label-smoothing {FINITE} inf"),
    ("triple_loss", ["--cos-weight", "nan"], f"--cos-weight {FINITE} nan"),
    ("triple_loss", ["--kd-weight", "inf"], f"--kd-weight {FINITE} inf"),
    ("triple_loss", ["--nll-weight", "nan"], f"--nll-weight {FINITE} nan"),
    ("triple_loss", ["--temperature", "nan"], "--temperature must be > 0.*got nan"),  # refused before too: kept
])
def test_non_finite_criterion_flags_are_refused(tiny_data, criterion, flags, message):
    cfg = training_config(tiny_data, "--arch", "transformer", "--teacher-path", "never-loaded.pt",
                          "--criterion", criterion, *flags)
    task = tasks.setup_task(cfg.task)
    with pytest.raises(ValueError, match=f"^{message}"):
        task.build_criterion(cfg.criterion)


@pytest.mark.parametrize("flags, message", [
    (["--kd-data-mode", "ratio", "--mix-ratios", "nan:1"], "--mix-ratios must be finite numbers"),
    (["--kd-data-mode", "ratio", "--mix-ratios", "1:inf"], "--mix-ratios must be finite numbers"),
    (["--kd-data-mode", "concat", "--gold-fraction", "nan"], "--gold-fraction must be a finite number"),
])
def test_non_finite_mixing_flags_are_refused_at_task_setup(tiny_data, flags, message):
    # the --kd-data directory is not read: the flags are checked when the task is set up
    with pytest.raises(ValueError, match=message):
        setup_distill_task(tiny_data, "--kd-data", tiny_data / "bin", *flags)


# --------------------------------------------------------------------- teacher cache


def test_teacher_path_with_a_teacher_cache_is_not_loaded_up_front(tiny_data, teacher, tmp_path, caplog):
    (tmp_path / "cache").mkdir()  # holds no split: the valid split needs the online teacher
    task = setup_distill_task(tiny_data, "--teacher-path", teacher, "--teacher-cache", tmp_path / "cache")
    model_cfg = training_config(tiny_data, *TINY_ARCH).model
    with caplog.at_level(logging.INFO):
        task.build_model(model_cfg)
    assert not task.teacher_loaded and "not loaded: --teacher-cache serves the splits" in caplog.text
    # a split without a cache runs the teacher online: loaded while the splits are loaded, with the reason
    with caplog.at_level(logging.INFO):
        task.load_dataset("valid")
    assert task.teacher_loaded
    assert f"loading teacher {teacher} next to --teacher-cache: split 'valid' has no cache" in caplog.text


# --------------------------------------------------------------------- unreadable checkpoints


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


class _TensorSubclass(torch.Tensor):
    pass


def write_bad_checkpoint(kind, teacher, path):
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = teacher.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "runs-code":
        torch.save({"model": {}, "cfg": None, "extra": _RunsCode()}, path)
    elif kind == "tensor-subclass":
        torch.save({"model": {"w": torch.zeros(2).as_subclass(_TensorSubclass)}, "cfg": None}, path)
    return path


BAD_CHECKPOINTS = [
    ("empty", r"is empty \(0 bytes\)"),
    ("truncated", r"is not a complete checkpoint, truncated"),
    ("runs-code", r"refused by torch's safe loader \(weights_only\): it names posix\.system.*nothing in the file was run"),
    ("tensor-subclass", r"refused by torch's safe loader.*it names .*_TensorSubclass"),
]


@pytest.mark.parametrize("kind, message", BAD_CHECKPOINTS)
def test_bad_teacher_checkpoint_names_the_file_and_the_problem(student_task, teacher, tmp_path, kind, message):
    path = write_bad_checkpoint(kind, teacher, tmp_path / f"{kind}.pt")
    with pytest.raises(CheckpointError, match=message) as err:
        Teacher.load(str(path), student_task, "fp32")
    assert f"teacher checkpoint {str(path)!r}" in str(err.value)


@pytest.mark.parametrize("kind, message", BAD_CHECKPOINTS)
def test_init_student_with_a_bad_teacher_exits_2_in_one_line(tiny_data, teacher, tmp_path, capsys, kind, message):
    path = write_bad_checkpoint(kind, teacher, tmp_path / f"{kind}.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        init_student_main([str(tiny_data / "bin"), "--teacher", str(path), "--output", str(tmp_path / "s.pt")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"fairseq-kd-init-student: error: teacher checkpoint {str(path)!r}") and re.search(message, err)
    assert not (tmp_path / "s.pt").exists()


def test_finetune_from_model_is_checked_before_training(tiny_data, teacher, tmp_path):
    path = write_bad_checkpoint("truncated", teacher, tmp_path / "init.pt")
    cfg = training_config(tiny_data, *TINY_ARCH, "--criterion", "label_smoothed_cross_entropy",
                          "--finetune-from-model", path)
    task = tasks.setup_task(cfg.task)
    with pytest.raises(CheckpointError, match=rf"--finetune-from-model {re.escape(repr(str(path)))} .* truncated"):
        task.build_model(cfg.model)


# --------------------------------------------------------------------- ':' in a path


def test_colon_in_a_teacher_file_name_says_what_colon_means(tiny_data, teacher, tmp_path):
    odd = tmp_path / "run:3"
    odd.mkdir()
    shutil.copy(teacher, odd / "teacher.pt")
    with pytest.raises(FileNotFoundError, match=r"':' separates the checkpoints of an ensemble, so this is read as 2 "
                       r"files, which were not found as given; the file itself exists.*Rename it, or link it"):
        setup_distill_task(tiny_data, "--teacher-path", odd / "teacher.pt")
    with pytest.raises(FileNotFoundError, match=r"'.*/run' \(from --teacher-path .*\) \(member 1 of 2: ':' separates"):
        Teacher.load(f"{tmp_path / 'run'}:{teacher}", None, "fp32")


# --------------------------------------------------------------------- checkpoint metadata size


@contextlib.contextmanager
def fails_after(seconds):
    """Raise in the main thread after ``seconds``: a hang fails the test instead of stalling it."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_config_of_shared_nested_lists_is_refused_quickly(student_task, teacher, tmp_path):
    """A 2 KB checkpoint whose config is 40 levels of lists sharing their children expands into 2^40
    nodes when fairseq turns it into an omegaconf object: every tool hung on it."""
    nested = []
    for _ in range(40):
        nested = [nested, nested]
    state = torch.load(teacher)
    state["cfg"]["model"].junk = nested
    path = tmp_path / "nested.pt"
    torch.save(state, path)
    assert path.stat().st_size < teacher.stat().st_size + 4096
    with fails_after(20), pytest.raises(CheckpointError, match=rf"{re.escape(repr(str(path)))}: its 'cfg' entry .*"
                                        rf"more than {CONFIG_MAX_NODES:,} values"):
        Teacher.load(str(path), student_task, "fp32")
    # a real fairseq config is far below the bound
    check_config_size(torch.load(teacher), "the teacher")
    nodes, stack = 0, [torch.load(teacher)["cfg"]]
    while stack:
        node, nodes = stack.pop(), nodes + 1
        stack.extend(node.values() if isinstance(node, dict) else node if isinstance(node, list) else [])
    assert nodes < CONFIG_MAX_NODES / 20, nodes


def test_deeply_nested_config_is_refused(teacher, tmp_path):
    deep = []
    for _ in range(CONFIG_MAX_DEPTH + 10):
        deep = [deep]
    with pytest.raises(CheckpointError, match="nested deeper than"):
        check_config_size({"cfg": {"model": deep}}, "x.pt")

