"""benchmarks/gpu_check.py: its CPU dry run passes every step end to end (so that the script the
GPU run depends on cannot rot), and a failing step is reported by name, with its dependants
skipped and a non-zero exit status."""

import json
import os
import subprocess
import sys
import types

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

SCRIPT = str(REPO / "benchmarks" / "gpu_check.py")
DRY_RUN_STEPS = [
    "environment", "data", "teacher", "distill_data", "distill_data_cpu_fp32", "compare_distill_data",
    "cache_teacher", "cache_teacher_cpu_fp32", "compare_cache", "loss_compare",
    "train_word_kd_fp32_teacher_auto", "train_hybrid_kd_fp32_teacher_bf16", "train_seq_kd_interp_fp32",
    "train_triple_loss_fp32_teacher_fp32", "train_word_kd_cached_fp32", "ddp_word_kd", "ddp_hybrid_kd", "throughput",
]


def check_script(tmp_path, *flags, timeout=900):
    """(exit status, stdout, JSON result) of one gpu_check.py run in ``tmp_path``."""
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--workdir", str(tmp_path / "work"), "--out", str(out), *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    return check_script(tmp_path_factory.mktemp("gpu_check"), "--dry-run")


def table_rows(stdout):
    """{step: status} from the printed table."""
    lines = stdout.split("\nstep ", 1)[1].splitlines()[1:]
    return {line.split()[0]: line.split()[1] for line in lines if line.strip() and not line.startswith(("passed", "FAILED"))}


@pytest.mark.slow
def test_dry_run_passes_every_step(dry_run):
    rc, stdout, result = dry_run
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == DRY_RUN_STEPS, list(steps)
    assert {name: s["status"] for name, s in steps.items() if s["status"] != "ok"} == {}, stdout[-4000:]
    assert rc == 0 and result["passed"] and result["failed_steps"] == []
    assert table_rows(stdout) == {name: "ok" for name in DRY_RUN_STEPS}, stdout[-3000:]
    assert result["environment"]["torch"] and result["environment"]["fairseq"]


@pytest.mark.slow
def test_dry_run_measures_what_the_gpu_run_reports(dry_run):
    _, _, result = dry_run
    metrics = {s["name"]: s.get("metrics", {}) for s in result["steps"]}
    loss = metrics["loss_compare"]
    assert set(loss["values"]) == set(gpu_check.CRITERIA)
    assert min(loss["chunks"].values()) >= 2, loss["chunks"]  # the chunked loss path ran
    assert loss["worst"]["cpu_fp32_again"]["max_rel_diff"] == 0.0
    assert 0 < loss["worst"]["cpu_teacher_bf16"]["max_rel_diff"] <= gpu_check.LOSS_TOLERANCES["half precision"]
    for compare in ("compare_distill_data", "compare_cache"):
        assert metrics[compare]["top1_agreement"] == 1.0, metrics[compare]
    assert metrics["compare_distill_data"]["sentences"] == gpu_check.DRY_SIZES.student_sentences
    for name in ("ddp_word_kd", "ddp_hybrid_kd"):
        assert metrics[name]["wrapper"] == "LegacyDistributedDataParallel"
        assert metrics[name]["num_updates"] == gpu_check.DRY_SIZES.updates
    assert {"online_fp32 / (S + F_fp32)", "online_auto / (S + F_auto)", "cached / S"} <= set(metrics["throughput"]["ratios"])
    assert set(metrics["throughput"]["online_memory"]) == {"online_fp32", "online_auto"}


@pytest.mark.slow
def test_a_step_over_its_time_limit_is_named_and_its_dependants_skipped(tmp_path):
    rc, stdout, result = check_script(tmp_path, "--dry-run", "--steps", "distill_data", "--timeout", "teacher=1",
                                      timeout=300)
    steps = {s["name"]: s for s in result["steps"]}
    assert rc == 1 and not result["passed"]
    assert [steps[n]["status"] for n in ("environment", "data", "teacher", "distill_data")] == \
        ["ok", "ok", "timeout", "skipped"], stdout[-3000:]
    assert "limit of 1 s" in steps["teacher"]["error"]
    assert steps["distill_data"]["error"] == "needs teacher, which did not pass"
    assert result["failed_steps"] == ["teacher", "distill_data"]
    assert table_rows(stdout)["teacher"] == "timeout"
    assert stdout.rstrip().endswith("FAILED: teacher, distill_data in %d s" % round(result["seconds"]))


def test_gpu_run_without_cuda_names_the_fix(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, stdout, result = check_script(tmp_path, "--steps", "data", timeout=120)
    environment, data = result["steps"]
    assert rc == 1 and environment["status"] == "failed"
    assert "sees no CUDA device" in environment["error"] and "CUDA build of torch" in environment["error"]
    assert data["status"] == "skipped" and data["error"] == "needs environment, which did not pass"


def test_a_failing_command_and_a_failed_expectation_are_reported_by_name(tmp_path):
    (tmp_path / "logs").mkdir()
    plan = types.SimpleNamespace(w=tmp_path, dry=True)

    def refuse(output):
        raise gpu_check.StepFailure(f"expected 50 updates, saw {output.strip()}")

    steps = [
        gpu_check.Step("crashes", "compare", [sys.executable, "-c", "import sys; print('RuntimeError: boom'); sys.exit(3)"]),
        gpu_check.Step("after_crash", "compare", [sys.executable, "-c", "print('ok')"], deps=["crashes"]),
        gpu_check.Step("short", "compare", [sys.executable, "-c", "print(7)"], check=refuse),
        gpu_check.Step("fine", "compare", [sys.executable, "-c", "import time; time.sleep(1); print('ok')"],
                       check=lambda output: {"said": output.strip()}),
        gpu_check.Step("after_fine", "compare", [sys.executable, "-c", "print('ok')"], deps=["fine"]),
    ]
    environment = {"name": "environment", "status": "ok", "seconds": 0}
    records = {r["name"]: r for r in gpu_check.run_all(steps, plan, 2, 60, {"compare": 30}, environment)}
    assert records["crashes"]["status"] == "failed"
    assert records["crashes"]["error"] == "exit status 3: RuntimeError: boom"
    assert records["after_crash"]["status"] == "skipped"
    assert records["after_crash"]["error"] == "needs crashes, which did not pass"
    assert records["short"]["status"] == "failed" and records["short"]["error"] == "expected 50 updates, saw 7"
    assert records["fine"]["status"] == "ok" and records["fine"]["metrics"] == {"said": "ok"}
    assert records["after_fine"]["status"] == "ok"  # waited for a dependency that was still running
    assert (tmp_path / "logs" / "crashes.log").read_text().strip() == "RuntimeError: boom"


def test_steps_past_the_whole_run_budget_are_skipped_by_name(tmp_path):
    (tmp_path / "logs").mkdir()
    plan = types.SimpleNamespace(w=tmp_path, dry=True)
    steps = [gpu_check.Step("sleeps", "compare", [sys.executable, "-c", "import time; time.sleep(30)"]),
             gpu_check.Step("next", "compare", [sys.executable, "-c", "print('ok')"])]
    environment = {"name": "environment", "status": "ok", "seconds": 0}
    records = {r["name"]: r for r in gpu_check.run_all(steps, plan, 1, 8, {"compare": 60}, environment)}
    assert records["sleeps"]["status"] == "timeout" and records["sleeps"]["seconds"] < 20
    assert records["next"]["status"] == "skipped" and "out of time" in records["next"]["error"]


def test_every_command_line_of_the_gpu_run_parses(tmp_path):
    """The GPU run's command lines cannot run here; their flags are parsed by the programs' own parsers."""
    import argparse

    from fairseq import options

    from fairseq_kd.cli import cache_teacher, distill_data

    plan = gpu_check.Plan(argparse.Namespace(dry_run=False, workdir=str(tmp_path), cpu_threads=8), gpu_check.GPU_SIZES)
    steps = {step.name: step for step in plan.steps()}
    train = [s for name, s in steps.items() if name.startswith(("train_", "ddp_")) or name == "teacher"]
    assert len(train) == 3 * 2 * 3 + 2 + 1 + 2 + 1
    backends = {}
    for step in train:
        command = step.command
        program = "fairseq_cli.train" if "fairseq_cli.train" in command else str(tmp_path / "ddp_launcher.py")
        parsed = options.parse_args_and_arch(options.get_training_parser(), command[command.index(program) + 1:])
        backends[step.name] = parsed.ddp_backend
        assert not parsed.cpu and parsed.max_update == (gpu_check.GPU_SIZES.updates if step.name != "teacher"
                                                        else gpu_check.GPU_SIZES.teacher_updates), step.name
        student = step.settings.get("student")
        assert (parsed.fp16, parsed.amp) == (student == "fp16" or step.name == "teacher", student == "amp"), step.name
        if step.settings.get("teacher_precision"):
            assert parsed.teacher_precision == step.settings["teacher_precision"], step.name
    assert backends["ddp_word_kd"] == backends["ddp_hybrid_kd"] == "pytorch_ddp"
    for name, module in (("distill_data", distill_data), ("cache_teacher", cache_teacher)):
        command = steps[name].command
        parsed = module.get_parser().parse_args(command[command.index(module.__name__) + 1:])
        assert not parsed.cpu and parsed.teacher_path == str(plan.teacher), name
    assert distill_data.get_parser().parse_args(steps["distill_data"].command[3:]).fp16
    assert steps["throughput"].command[-1] == "--cuda" and steps["throughput"].exclusive
