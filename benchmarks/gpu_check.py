"""The plugin's CUDA paths, checked in one command on one GPU (issue #16).

Builds its own data (the shipped Multi30k en-de, a sentencepiece vocabulary trained on the fly) and
a small teacher, then runs every step below as a subprocess with a hard time limit, records each
step's status, seconds and metrics, continues after a failing step (its dependants are skipped,
naming it), writes one JSON file, prints a table and exits non-zero when any step did not pass.

    environment            torch sees a GPU (else: how to install a CUDA build); versions, device name
    data                   sentencepiece model, binarized teacher data and a 2,000-sentence student split
    teacher                a 3+3-layer d=256 teacher (fairseq-train --fp16)
    distill_data           fairseq-kd-distill-data --fp16 on CUDA, 2,000 sentences, beam 5
    distill_data_cpu_fp32  the same on CPU in fp32; compare_distill_data: same count and order, top1 agreement
    cache_teacher          fairseq-kd-cache-teacher on CUDA (teacher in auto = fp16), top-8
    cache_teacher_cpu_fp32 the same on CPU in fp32; compare_cache: same rows, top1 agreement, log-prob error
    loss_compare           each criterion's loss and gradient norm on one fixed batch: CPU fp32 against
                           CUDA fp32, CUDA --fp16 / --amp students and teachers in fp16 / bf16 (tolerances
                           in LOSS_TOLERANCES)
    train_*                word_kd, hybrid_kd, triple_loss: 50 updates each with --fp16 and --amp, the
                           teacher in auto, fp16, bf16; seq_kd_interp (no teacher) with --fp16 and --amp;
                           word_kd from the top-8 cache
    ddp_word_kd, ddp_hybrid_kd
                           torchrun, 1 GPU, --ddp-backend pytorch_ddp; fairseq skips its DDP wrapper for a
                           single worker, so the launcher makes it wrap the student all the same
    throughput             benchmarks/kd_throughput.py --cuda: online / (S + F), cached / S, and peak CUDA
                           memory against S's peak + teacher weights + one teacher distribution (alone)

On a GPU machine (a CUDA build of torch installed first, see docs/performance.md), from the repo root:

    .venv/bin/python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

The whole run is limited to --budget seconds (480). ``--dry-run`` runs the same steps on CPU with
tiny sizes (fp32 student, the CPU precisions of the teacher, gloo + legacy_ddp), so that the
script is exercised without a GPU (tests/test_gpu_check.py). The script installs nothing.
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
USER_DIR = str(REPO / "fairseq_kd")
SRC, TGT = "en", "de"
RESULT_PREFIX = "GPU_CHECK_RESULT "
CRITERIA = ("word_kd", "hybrid_kd", "seq_kd_interp", "triple_loss")
TEACHER_PRECISIONS = ("auto", "fp16", "bf16")
# |value - reference| <= tolerance * max(|reference|, 1), per logged loss term and for the gradient norm
LOSS_TOLERANCES = {"same computation": 1e-6, "fp32": 1e-4, "half precision": 1e-2}
DISTILL_TOP1_FLOOR = 0.8  # beam-5 top1 agreement, fp16 CUDA teacher against the fp32 CPU teacher
CUDA_INSTALL_HINT = (
    "this is torch's CPU build (make install pins it through constraints-cpu.txt) or no GPU is visible. Install "
    "a CUDA build of torch first, e.g. in a new venv: pip install torch==2.13.0 --index-url "
    "https://download.pytorch.org/whl/<the CUDA tag of your driver, e.g. cu128>, then pip install -e .[test] "
    "without PIP_CONSTRAINT (docs/performance.md, section GPU); check with python -c 'import torch; "
    "print(torch.cuda.is_available())'. Without a GPU, run with --dry-run."
)


@dataclass
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run besides the device."""

    vocab: int
    teacher_sentences: Optional[int]  # None: all of Multi30k's training set
    student_sentences: int
    valid_sentences: int
    teacher_arch: List[str]
    student_arch: List[str]
    teacher_updates: int
    teacher_max_tokens: int
    updates: int
    max_tokens: int
    beam: int
    throughput: List[str]
    jobs: int
    budget: float
    timeouts: Dict[str, float]


def transformer(enc: int, dec: int, dim: int, ffn: int, heads: int) -> List[str]:
    return ["--arch", "transformer", "--share-all-embeddings", "--encoder-layers", str(enc), "--decoder-layers",
            str(dec), "--encoder-embed-dim", str(dim), "--decoder-embed-dim", str(dim), "--encoder-ffn-embed-dim",
            str(ffn), "--decoder-ffn-embed-dim", str(ffn), "--encoder-attention-heads", str(heads),
            "--decoder-attention-heads", str(heads)]


GPU_SIZES = Sizes(
    vocab=8000, teacher_sentences=None, student_sentences=2000, valid_sentences=500,
    teacher_arch=transformer(3, 3, 256, 1024, 4), student_arch=transformer(2, 1, 256, 1024, 4),
    teacher_updates=800, teacher_max_tokens=8192, updates=50, max_tokens=4096, beam=5,
    throughput=["--sentences", "6000", "--batches", "20", "--warmup", "3", "--max-tokens", "4096"],
    jobs=6, budget=480,
    timeouts={"data": 90, "teacher": 150, "distill_data": 90, "distill_data_cpu_fp32": 150, "cache_teacher": 60,
              "cache_teacher_cpu_fp32": 90, "compare": 30, "loss_compare": 120, "train": 90, "ddp": 120,
              "throughput": 180},
)
DRY_SIZES = Sizes(
    vocab=1000, teacher_sentences=2000, student_sentences=300, valid_sentences=50,
    teacher_arch=transformer(1, 1, 64, 128, 2), student_arch=transformer(1, 1, 64, 128, 2),
    teacher_updates=40, teacher_max_tokens=1024, updates=4, max_tokens=1024, beam=2,
    throughput=["--sentences", "300", "--batches", "2", "--warmup", "1", "--max-tokens", "1024"],
    jobs=1, budget=900,
    timeouts={"data": 120, "teacher": 120, "distill_data": 90, "distill_data_cpu_fp32": 90, "cache_teacher": 60,
              "cache_teacher_cpu_fp32": 60, "compare": 60, "loss_compare": 150, "train": 90, "ddp": 120,
              "throughput": 240},
)


class StepFailure(Exception):
    """An expectation of a step that its run did not meet."""


# ----------------------------------------------------------------------------------------------
# the steps


@dataclass
class Step:
    name: str
    kind: str  # timeout class in Sizes.timeouts
    command: List[str] = field(default_factory=list)
    deps: List[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    check: Optional[Callable[[str], dict]] = None  # output -> metrics; raises StepFailure
    exclusive: bool = False  # runs alone (timing)
    env: dict = field(default_factory=dict)


class Plan:
    """The paths and command lines of one run."""

    def __init__(self, args, sizes: Sizes):
        self.args, self.sizes, self.dry = args, sizes, args.dry_run
        self.w = Path(args.workdir)
        self.device = "cpu" if self.dry else "cuda"
        self.teacher = self.w / "teacher" / "checkpoint_last.pt"
        self.bin, self.teacher_bin = self.w / "bin", self.w / "teacher-bin"

    def python(self, *argv) -> List[str]:
        return [sys.executable, *map(str, argv)]

    def internal(self, name, **kwargs) -> List[str]:
        cmd = self.python(__file__, "--internal", name, "--workdir", self.w, "--cpu-threads", self.args.cpu_threads)
        cmd += ["--dry-run"] if self.dry else []
        return cmd + [f"--internal-arg={k}={v}" for k, v in kwargs.items()]

    def common_train(self, save_dir, updates, max_tokens) -> List[str]:
        return ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.001", "--lr-scheduler",
                "inverse_sqrt", "--warmup-updates", str(max(1, updates // 4)), "--max-tokens", str(max_tokens),
                "--max-update", str(updates), "--save-dir", str(save_dir), "--no-epoch-checkpoints",
                "--required-batch-size-multiple", "1", "--no-progress-bar", "--log-format", "simple",
                "--log-interval", "10", "--seed", "1", "--num-workers", "0", "--data-buffer-size", "0",
                "--dropout", "0.1"] + (["--cpu"] if self.dry else [])

    def student_train(self, name, criterion, student, teacher_precision, extra=()) -> List[str]:
        """fairseq-train argv (after the program) of one translation_distill student."""
        flags = {
            "word_kd": ["--criterion", "word_kd", "--alpha", "0.5", "--temperature", "1"],
            "hybrid_kd": ["--criterion", "hybrid_kd", "--kd-data", str(self.w / "kd"), "--word-kd-prefix", "teacher"],
            "seq_kd_interp": ["--criterion", "seq_kd_interp", "--alpha", "0.5", "--kd-data", str(self.w / "kd")],
            "triple_loss": ["--criterion", "triple_loss", "--kd-weight", "1", "--nll-weight", "1", "--cos-weight",
                            "1", "--student-init", "spread"],
        }[criterion]
        teacher = ["--teacher-path", str(self.teacher)] if criterion != "seq_kd_interp" or "--teacher-cache" in extra else []
        teacher += ["--teacher-precision", teacher_precision] if teacher_precision and teacher else []
        precision = {"fp16": ["--fp16"], "amp": ["--amp"], "fp32": []}[student]
        return [str(self.bin), "--user-dir", USER_DIR, "--task", "translation_distill", "-s", SRC, "-t", TGT,
                *self.sizes.student_arch, *flags, *teacher, *precision, *extra,
                *self.common_train(self.w / "students" / name, self.sizes.updates, self.sizes.max_tokens)]

    def steps(self) -> List[Step]:
        s, w, dev_flags = self.sizes, self.w, (["--cpu"] if self.dry else [])
        steps = [
            Step("data", "data", self.internal("data"), settings={"vocab": s.vocab, "student_sentences": s.student_sentences}),
            Step("teacher", "teacher", self.python("-m", "fairseq_cli.train", self.teacher_bin, "--task", "translation",
                                                   "-s", SRC, "-t", TGT, *s.teacher_arch, "--criterion",
                                                   "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                                                   "--disable-validation", *([] if self.dry else ["--fp16"]),
                                                   *self.common_train(w / "teacher", s.teacher_updates, s.teacher_max_tokens)),
                 deps=["data"], settings={"updates": s.teacher_updates}, check=self.check_teacher),
        ]
        distill = ["-m", "fairseq_kd.cli.distill_data", self.bin, "--teacher-path", self.teacher, "--split", "train",
                   "--beam", s.beam, "--max-tokens", 8000, "--select", "top1", "--log-interval", 60]
        cache = ["-m", "fairseq_kd.cli.cache_teacher", self.bin, "--teacher-path", self.teacher, "--split", "train",
                 "--k", 8]
        cpu_env = {"OMP_NUM_THREADS": str(self.args.cpu_threads)}
        steps += [
            Step("distill_data", "distill_data", self.python(*distill, "--destdir", w / "kd", *(dev_flags or ["--fp16"])),
                 deps=["teacher"], settings={"device": self.device, "fp16": not self.dry, "beam": s.beam},
                 check=self.check_distill(w / "kd")),
            Step("distill_data_cpu_fp32", "distill_data_cpu_fp32",
                 self.python(*distill, "--destdir", w / "kd-cpu", "--cpu"), deps=["teacher"],
                 settings={"device": "cpu", "fp16": False, "beam": s.beam}, check=self.check_distill(w / "kd-cpu"),
                 env=cpu_env),
            Step("compare_distill_data", "compare", self.internal("compare_distill_data"),
                 deps=["distill_data", "distill_data_cpu_fp32"],
                 settings={"top1_floor": 1.0 if self.dry else DISTILL_TOP1_FLOOR}),
            Step("cache_teacher", "cache_teacher", self.python(*cache, "--destdir", w / "cache" / "train", *dev_flags,
                                                               "--teacher-precision", "fp32" if self.dry else "auto"),
                 deps=["teacher"], settings={"device": self.device, "teacher_precision": "fp32" if self.dry else "auto"},
                 check=self.check_cache),
            Step("cache_teacher_cpu_fp32", "cache_teacher_cpu_fp32",
                 self.python(*cache, "--destdir", w / "cache-cpu" / "train", "--cpu", "--teacher-precision", "fp32"),
                 deps=["teacher"], settings={"device": "cpu", "teacher_precision": "fp32"}, check=self.check_cache,
                 env=cpu_env),
            Step("compare_cache", "compare", self.internal("compare_cache"), deps=["cache_teacher", "cache_teacher_cpu_fp32"]),
            Step("loss_compare", "loss_compare", self.internal("loss_compare"), deps=["teacher", "distill_data"],
                 settings={"tolerances": LOSS_TOLERANCES}),
        ]
        for criterion, student, teacher in train_matrix(self.dry):
            name = f"train_{criterion}_{student}" + (f"_teacher_{teacher}" if teacher else "")
            deps = ["teacher"] + (["distill_data"] if criterion in ("hybrid_kd", "seq_kd_interp") else [])
            steps.append(Step(name, "train", self.python("-m", "fairseq_cli.train",
                                                         *self.student_train(name, criterion, student, teacher)),
                              deps=deps, settings={"criterion": criterion, "student": student, "teacher_precision": teacher},
                              check=self.check_train(teacher)))
        student = "fp32" if self.dry else "fp16"
        name = f"train_word_kd_cached_{student}"
        steps.append(Step(name, "train", self.python("-m", "fairseq_cli.train", *self.student_train(
            name, "word_kd", student, None, extra=["--teacher-cache", str(w / "cache")])),
            deps=["cache_teacher"], settings={"criterion": "word_kd", "student": student, "teacher": "top-8 cache"},
            check=self.check_train(None)))
        for criterion in ("word_kd", "hybrid_kd"):
            name = f"ddp_{criterion}"
            distributed = ["--distributed-world-size", "1", "--distributed-init-method", "env://",
                           "--distributed-no-spawn", "--distributed-rank", "-1"]
            distributed += (["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"] if self.dry
                            else ["--ddp-backend", "pytorch_ddp"])
            launcher = w / "ddp_launcher.py"
            deps = ["teacher"] + (["distill_data"] if criterion == "hybrid_kd" else [])
            steps.append(Step(name, "ddp", self.python(
                "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", launcher,
                *self.student_train(name, criterion, student, "auto", extra=distributed)),
                deps=deps, settings={"criterion": criterion, "student": student, "ddp_backend": distributed[-1]},
                check=self.check_ddp("LegacyDistributedDataParallel" if self.dry else "DistributedDataParallel")))
        steps.append(Step("throughput", "throughput", self.python(
            REPO / "benchmarks" / "kd_throughput.py", "--teacher", self.teacher, "--spm", w / "spm.model", "--dict",
            self.teacher_bin / f"dict.{SRC}.txt", "--data", REPO / "data" / "multi30k", "--threads",
            self.args.cpu_threads, *s.throughput, "--out", w / "kd_throughput.json", *([] if self.dry else ["--cuda"])),
            deps=["teacher"], exclusive=True, settings={"device": self.device}, check=self.check_throughput))
        return steps

    # ---- checks of the CLI steps' outputs (each returns metrics or raises StepFailure)

    def check_teacher(self, output: str) -> dict:
        if not self.teacher.is_file():
            raise StepFailure(f"no teacher checkpoint at {self.teacher}")
        return last_train_stats(output, self.sizes.teacher_updates)

    def check_distill(self, destdir: Path):
        def check(output: str) -> dict:
            summary_path = destdir / "train.kd.summary.json"
            if not summary_path.is_file():
                raise StepFailure(f"{summary_path} was not written")
            summary = json.loads(summary_path.read_text())
            if summary["sentences"] != self.sizes.student_sentences:
                raise StepFailure(f"{summary['sentences']} sentences translated, expected {self.sizes.student_sentences}")
            rate = re.findall(r"\(([\d.]+) sentences/s\)", output)
            return {"sentences": summary["sentences"], "pairs_written": summary["pairs_written"],
                    "sentences_per_s": float(rate[-1]) if rate else None}
        return check

    def check_cache(self, output: str) -> dict:
        match = re.search(r"this run: .*?([\d,]+) sentences, ([\d,]+) target tokens in ([\d.]+) s", output)
        if not match:
            raise StepFailure("no 'this run:' summary line in the output")
        sentences = int(match.group(1).replace(",", ""))
        if sentences != self.sizes.student_sentences:
            raise StepFailure(f"{sentences} sentences cached, expected {self.sizes.student_sentences}")
        precision = re.search(r"teacher on (\S+) in (\w+)", output)
        return {"sentences": sentences, "target_tokens": int(match.group(2).replace(",", "")),
                "seconds": float(match.group(3)), "teacher": precision and f"{precision.group(1)} {precision.group(2)}"}

    def check_train(self, teacher_precision: Optional[str]):
        def check(output: str) -> dict:
            metrics = last_train_stats(output, self.sizes.updates)
            placed = re.findall(r"teacher on (\S+) in (\w+)", output)
            if teacher_precision:
                expected = self.resolved_precision(teacher_precision)
                if not placed:
                    raise StepFailure("the teacher was never placed on a device (no 'teacher on ... in ...' line)")
                device, precision = placed[0]
                if not device.startswith(self.device) or precision != expected:
                    raise StepFailure(f"teacher on {device} in {precision}, expected {self.device} in {expected}")
                metrics["teacher"] = f"{device} {precision}"
            return metrics
        return check

    def check_ddp(self, wrapper: str):
        train_check = self.check_train("auto")

        def check(output: str) -> dict:
            if not re.search(rf"gpu_check: wrapped .*\b{wrapper} > TransformerModel", output):
                raise StepFailure(f"the student was not wrapped in {wrapper}")
            return dict(train_check(output), wrapper=wrapper)
        return check

    def check_throughput(self, output: str) -> dict:
        result = json.loads((self.w / "kd_throughput.json").read_text())
        metrics = {"ratios": result["ratios"], "online_memory": result["online_memory"],
                   "ms_per_step": {k: round(v["step_s"] * 1000, 2) for k, v in result["results"].items()}}
        findings = [f"{name} = {value:.2f} > 1.10" for name, value in result["ratios"].items()
                    if name in ("online_fp32 / (S + F_fp32)", "online_auto / (S + F_auto)", "cached / S") and value > 1.10]
        key = "peak_cuda_mb" if not self.dry else "peak_rss_mb"
        findings += [f"{config} peak {m[key]:.0f} MB over its budget {m['budget_mb']:.0f} MB"
                     for config, m in result["online_memory"].items() if m[key] > m["budget_mb"]]
        metrics["over_target"] = findings  # measured, reported; not a failure of the step
        return metrics

    def resolved_precision(self, precision: str) -> str:
        import torch

        from fairseq_kd.teacher import resolve_precision

        return resolve_precision(precision, torch.device(self.device))


def train_matrix(dry: bool):
    """(criterion, student precision, teacher precision or None) of the train_* steps. On CPU the
    student trains in fp32 (fairseq's --fp16 needs CUDA) and the teacher runs in the CPU's precisions."""
    if dry:
        return [("word_kd", "fp32", "auto"), ("hybrid_kd", "fp32", "bf16"), ("seq_kd_interp", "fp32", None),
                ("triple_loss", "fp32", "fp32")]
    return [(criterion, student, teacher) for criterion in CRITERIA for student in ("fp16", "amp")
            for teacher in ((None,) if criterion == "seq_kd_interp" else TEACHER_PRECISIONS)]


def last_train_stats(output: str, updates: int) -> dict:
    """The last epoch summary of a fairseq-train log (``| train | epoch ...``, or ``train:epoch ...`` under
    torchrun), checked: ``updates`` updates, finite loss."""
    lines = [m.group(1) for m in re.finditer(r"(?:\| train \| |INFO:train:)(epoch \d+ \|.*)", output)]
    if not lines:
        raise StepFailure("no '| train | epoch' line in the output")
    stats = dict(f.strip().split(" ", 1) for f in lines[-1].split("|") if " " in f.strip())
    if int(stats.get("num_updates", -1)) != updates:
        raise StepFailure(f"stopped at {stats.get('num_updates')} updates, expected {updates}")
    loss = float(stats["loss"])
    if not math.isfinite(loss):
        raise StepFailure(f"loss {loss}")
    return {k: float(v) for k, v in stats.items() if k in ("loss", "nll_loss", "kd_loss", "wps", "loss_scale", "num_updates")}


# ----------------------------------------------------------------------------------------------
# running steps


def run_step(step: Step, plan: Plan, timeout: float) -> dict:
    """Run ``step``'s command in its own process group, killed with its children after ``timeout``."""
    log = plan.w / "logs" / f"{step.name}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1" if plan.dry else "2", GPU_CHECK_FORCE_DDP_WRAPPER="1")
    env.update(step.env)
    start = time.perf_counter()
    record = {"name": step.name, "settings": step.settings, "log": str(log), "timeout_s": round(timeout)}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(c) for c in step.command], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=plan.w, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    record["seconds"] = round(time.perf_counter() - start, 1)
    output = log.read_text(errors="replace")
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    record["metrics"] = results[-1]["metrics"] if results else {}
    if rc is None:
        record.update(status="timeout", error=f"killed after its limit of {timeout:.0f} s")
    elif rc != 0:
        failures = results[-1].get("failures") if results else None
        record.update(status="failed", error="; ".join(failures) if failures else f"exit status {rc}: {last_error(output)}")
    else:
        try:
            if step.check:
                record["metrics"].update(step.check(output))
            record["status"] = "ok"
        except (StepFailure, OSError, ValueError, KeyError) as e:
            record.update(status="failed", error=f"{type(e).__name__}: {e}" if not isinstance(e, StepFailure) else str(e))
    if record["status"] != "ok":
        record["output_tail"] = output[-3000:]
    return record


def last_error(output: str) -> str:
    """The most telling line of a failed command's output: its last error line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"Error|error:|Exception|Traceback|Killed", line)]
    return (errors or lines or ["(no output)"])[-1][:400]


def run_all(steps: List[Step], plan: Plan, jobs: int, budget: float, timeouts: Dict[str, float],
            environment: dict) -> List[dict]:
    """Run ``steps`` in order as their dependencies allow, ``jobs`` at a time (exclusive ones alone),
    within ``budget`` seconds; a step whose dependency did not pass is skipped, naming it."""
    records = {"environment": environment}
    deadline = time.perf_counter() + budget
    pending, running = list(steps), {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for step in list(pending):
                bad = [d for d in ["environment", *step.deps] if d in records and records[d]["status"] != "ok"]
                missing = [d for d in step.deps if d not in records
                           and d not in {s.name for s in pending} | {s.name for s in running.values()}]
                if bad or missing:
                    pending.remove(step)
                    records[step.name] = {"name": step.name, "status": "skipped", "seconds": 0, "settings": step.settings,
                                          "error": f"needs {', '.join(bad + missing)}, which did not pass"
                                          if bad else f"needs {', '.join(missing)}, not selected"}
            for step in list(pending):
                if len(running) >= jobs or any(s.exclusive for s in running.values()):
                    break
                if not all(d in records for d in step.deps):
                    if step.exclusive:
                        break  # nothing starts ahead of a waiting exclusive step
                    continue
                if step.exclusive and running:
                    break
                pending.remove(step)
                left = deadline - time.perf_counter()
                if left < 5:
                    records[step.name] = {"name": step.name, "status": "skipped", "seconds": 0, "settings": step.settings,
                                          "error": f"out of time: the whole run is limited to {budget:.0f} s (--budget)"}
                    continue
                limit = min(timeouts.get(step.name, timeouts[step.kind]), left)
                print(f"[{time.strftime('%H:%M:%S')}] start {step.name} (limit {limit:.0f} s)", flush=True)
                running[pool.submit(run_step, step, plan, limit)] = step
            if not running:
                continue
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                step = running.pop(future)
                try:
                    record = future.result()
                except Exception:  # a bug of this script: name the step, keep going
                    record = {"name": step.name, "status": "failed", "seconds": 0, "settings": step.settings,
                              "error": f"gpu_check.py itself failed: {traceback.format_exc(limit=-1).strip()}"}
                records[step.name] = record
                print(f"[{time.strftime('%H:%M:%S')}] {record['status']:7s} {step.name} ({record['seconds']} s)"
                      + (f": {record['error']}" if record.get("error") else ""), flush=True)
    return [records["environment"]] + [records[s.name] for s in steps if s.name in records]


def select_steps(steps: List[Step], wanted: Optional[str]) -> List[Step]:
    """``--steps`` and everything they depend on, in plan order."""
    if not wanted:
        return steps
    by_name = {s.name: s for s in steps}
    unknown = [n for n in wanted.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"gpu_check.py: unknown steps {unknown}; steps: {', '.join(by_name)}")
    keep, todo = set(), wanted.split(",")
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo += by_name[name].deps
    return [s for s in steps if s.name in keep]


def environment_step(dry: bool) -> dict:
    """Versions and device; fails (naming the fix) where a GPU run finds no CUDA device."""
    start = time.perf_counter()
    record = {"name": "environment", "settings": {"dry_run": dry}}
    try:
        import importlib.metadata as metadata
        import platform

        import fairseq
        import torch

        def version(dist):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                return None

        metrics = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                   "fairseq": fairseq.__version__, "fairseq_kd": version("fairseq-kd") or "not installed (source tree)",
                   "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                   "cuda_available": torch.cuda.is_available()}
        if torch.cuda.is_available():
            metrics.update(device=torch.cuda.get_device_name(), device_count=torch.cuda.device_count(),
                           bf16_supported=torch.cuda.is_bf16_supported(),
                           memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                           tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
        else:
            metrics["device"] = "cpu (dry run)" if dry else None
        record["metrics"] = metrics
        if not dry and not torch.cuda.is_available():
            record.update(status="failed", error=f"torch {torch.__version__} sees no CUDA device: {CUDA_INSTALL_HINT}")
        else:
            record["status"] = "ok"
    except Exception as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def brief(record: dict) -> str:
    """A few metrics of a step, for the table."""
    m = record.get("metrics") or {}
    name = record["name"]
    if name == "environment":
        return f"{m.get('device')}, torch {m.get('torch')}, fairseq {m.get('fairseq')}"
    if name.startswith(("train_", "ddp_", "teacher")) and "loss" in m:
        return f"loss {m['loss']:.3f} after {m.get('num_updates', 0):.0f} updates" + (f", {m['teacher']}" if m.get("teacher") else "")
    if name == "loss_compare" and "worst" in m:
        return ", ".join(f"{k} {v['max_rel_diff']:.1e} (tol {v['tolerance']:.0e})" for k, v in m["worst"].items())
    if name.startswith("compare_") and "top1_agreement" in m:
        return f"{m.get('sentences', m.get('tokens'))} items, top1 agreement {m['top1_agreement']:.4f}"
    if name == "throughput" and "ratios" in m:
        r = m["ratios"]
        return (f"online_auto/(S+F) {r['online_auto / (S + F_auto)']:.2f}, cached/S {r['cached / S']:.2f}"
                + (f"; over target: {'; '.join(m['over_target'])}" if m["over_target"] else ""))
    if "sentences" in m:
        return f"{m['sentences']} sentences"
    return ""


def print_table(records: List[dict]) -> None:
    width = max(len(r["name"]) for r in records)
    print(f"\n{'step':{width}s}  {'status':7s}  {'s':>6s}  result")
    for r in records:
        detail = r.get("error") or brief(r)
        print(f"{r['name']:{width}s}  {r['status']:7s}  {r.get('seconds', 0):6.1f}  {detail[:300]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same steps on CPU with tiny sizes (no GPU needed)")
    parser.add_argument("--out", help="JSON result file (default: benchmarks/results/gpu_check.json; with "
                        "--dry-run: gpu_check.json in the work directory)")
    parser.add_argument("--workdir", help="where data, models and per-step logs go (default: a new temporary directory, kept)")
    parser.add_argument("--jobs", type=int, help="steps run at a time (default: 6 on GPU, 1 in the dry run)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: 480 on GPU, 900 dry)")
    parser.add_argument("--cpu-threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads of the CPU reference steps and of kd_throughput.py")
    parser.add_argument("--steps", help="comma-separated steps to run (with what they need); default: all")
    parser.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS",
                        help="override one step's time limit (repeatable)")
    parser.add_argument("--internal", help=argparse.SUPPRESS)
    parser.add_argument("--internal-arg", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    if args.internal:
        if args.dry_run:
            args.cpu_threads = 1
        run_internal(args, sizes)
        return
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="gpu_check."))
    (Path(args.workdir) / "logs").mkdir(parents=True, exist_ok=True)
    out = args.out or os.path.join(args.workdir if args.dry_run else REPO / "benchmarks" / "results", "gpu_check.json")
    if args.dry_run:
        args.cpu_threads = 1
    timeouts = dict(sizes.timeouts)
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        timeouts[name] = float(seconds)
    plan = Plan(args, sizes)
    (plan.w / "ddp_launcher.py").write_text(DDP_LAUNCHER)
    start = time.perf_counter()
    print(f"gpu_check: {'dry run on CPU' if args.dry_run else 'GPU run'}, work directory {args.workdir}", flush=True)
    environment = environment_step(args.dry_run)
    steps = select_steps(plan.steps(), args.steps)
    records = run_all(steps, plan, args.jobs or sizes.jobs, args.budget or sizes.budget, timeouts, environment)
    passed = all(r["status"] == "ok" for r in records)
    summary = {"dry_run": args.dry_run, "passed": passed, "seconds": round(time.perf_counter() - start, 1),
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "workdir": args.workdir,
               "failed_steps": [r["name"] for r in records if r["status"] != "ok"]}
    from kd_throughput import write_summary

    args.out, args.threads, args.cuda = out, args.cpu_threads, records[0]["metrics"].get("cuda_available", False)
    write_summary(args, ("internal", "internal_arg", "threads", "cuda"), **summary,
                  environment=records[0]["metrics"], steps=records)
    print_table(records)
    print(f"\n{'passed' if passed else 'FAILED: ' + ', '.join(summary['failed_steps'])} in {summary['seconds']:.0f} s")
    sys.exit(0 if passed else 1)


# A torchrun worker that runs fairseq-train with fairseq's data-parallel wrapper even for one worker
# (fairseq only wraps the student when there are several), and says which wrapper it got.
DDP_LAUNCHER = """\
import os
import sys

from fairseq import models, trainer
from fairseq_cli.train import cli_main

if os.environ.get("GPU_CHECK_FORCE_DDP_WRAPPER") == "1":
    trainer.Trainer.use_distributed_wrapper = property(lambda self: not self.cfg.optimization.use_bmuf)
    wrap = models.DistributedFairseqModel

    def announce(*args, **kwargs):
        wrapped = module = wrap(*args, **kwargs)
        chain = [type(module).__name__]
        while hasattr(module, "module"):
            module = module.module
            chain.append(type(module).__name__)
        print(f"gpu_check: wrapped {' > '.join(chain)}", flush=True)
        return wrapped

    trainer.models.DistributedFairseqModel = announce
sys.exit(cli_main())
"""


# ----------------------------------------------------------------------------------------------
# internal steps (run as subprocesses of this script)


def run_internal(args, sizes: Sizes) -> None:
    kwargs = dict(item.split("=", 1) for item in args.internal_arg)
    failures, metrics = [], {}
    try:
        metrics = INTERNAL[args.internal](args, sizes, failures, **kwargs)
    finally:
        print(RESULT_PREFIX + json.dumps({"metrics": metrics, "failures": failures}), flush=True)
    sys.exit(1 if failures else 0)


def internal_data(args, sizes: Sizes, failures: list) -> dict:
    """Sentencepiece on the teacher's training text, then binarized teacher and student data."""
    import sentencepiece as spm

    w, data = Path(args.workdir), REPO / "data" / "multi30k"
    raw = w / "raw"
    raw.mkdir(exist_ok=True)

    def read(name, n):
        with open(data / name, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        return lines[:n] if n else lines

    train = {lang: read(f"train.{lang}", sizes.teacher_sentences) for lang in (SRC, TGT)}
    valid = {lang: read(f"test_2016_flickr.{lang}", sizes.valid_sentences) for lang in (SRC, TGT)}
    (raw / "spm.txt").write_text("".join(line + "\n" for lang in (SRC, TGT) for line in train[lang]), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(raw / "spm.txt"), model_prefix=str(w / "spm"), vocab_size=sizes.vocab,
                                   character_coverage=1.0, num_threads=args.cpu_threads, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(w / "spm.model"))
    splits = {"teacher_train": train, "student_train": {k: v[: sizes.student_sentences] for k, v in train.items()},
              "valid": valid}
    for split, text in splits.items():
        for lang in (SRC, TGT):
            with open(raw / f"{split}.{lang}", "w", encoding="utf-8") as f:
                f.writelines(" ".join(sp.encode(line, out_type=str)) + "\n" for line in text[lang])
    preprocess = [sys.executable, "-m", "fairseq_cli.preprocess", "-s", SRC, "-t", TGT, "--workers",
                  str(args.cpu_threads)]
    subprocess.run(preprocess + ["--joined-dictionary", "--trainpref", str(raw / "teacher_train"), "--validpref",
                                 str(raw / "valid"), "--destdir", str(w / "teacher-bin")], check=True)
    joined = str(w / "teacher-bin" / f"dict.{SRC}.txt")
    subprocess.run(preprocess + ["--srcdict", joined, "--tgtdict", joined, "--trainpref", str(raw / "student_train"),
                                 "--validpref", str(raw / "valid"), "--destdir", str(w / "bin")], check=True)
    return {"vocab": len(sp), "teacher_sentences": len(train[SRC]), "student_sentences": sizes.student_sentences,
            "valid_sentences": len(valid[SRC])}


def internal_compare_distill_data(args, sizes: Sizes, failures: list) -> dict:
    """The device run's and the CPU fp32 run's teacher translations: same sources in the same
    order, and how many top1 hypotheses agree."""
    w = Path(args.workdir)
    floor = 1.0 if args.dry_run else DISTILL_TOP1_FLOOR

    def lines(d, lang):
        return (w / d / f"train.kd.{lang}").read_text(encoding="utf-8").splitlines()

    src, ref_src = lines("kd", SRC), lines("kd-cpu", SRC)
    hyp, ref_hyp = lines("kd", TGT), lines("kd-cpu", TGT)
    if len(src) != len(ref_src) or len(hyp) != len(ref_hyp) or len(src) != len(hyp):
        failures.append(f"counts differ: {len(src)}/{len(hyp)} source/hypothesis lines against {len(ref_src)}/"
                        f"{len(ref_hyp)} from the CPU fp32 run")
        return {}
    if src != ref_src:
        first = next(i for i, (a, b) in enumerate(zip(src, ref_src)) if a != b)
        failures.append(f"the sources are in another order (first difference at line {first})")
    agree = sum(a == b for a, b in zip(hyp, ref_hyp)) / len(hyp)
    if agree < floor:
        failures.append(f"top1 agreement {agree:.4f} below {floor}")
    return {"sentences": len(hyp), "top1_agreement": agree, "floor": floor, "same_order": src == ref_src}


def internal_compare_cache(args, sizes: Sizes, failures: list) -> dict:
    """The device cache against the CPU fp32 cache: same sentences and rows, top1 ids agreement,
    largest difference of the stored top1 log-probability."""
    import numpy as np

    from fairseq_kd.teacher_cache import TeacherCache

    w = Path(args.workdir)
    cache, ref = TeacherCache(str(w / "cache" / "train")), TeacherCache(str(w / "cache-cpu" / "train"))
    if cache.num_sentences != ref.num_sentences or not np.array_equal(cache.offsets, ref.offsets):
        failures.append(f"{cache.num_sentences} sentences / {cache.offsets[-1]} rows against {ref.num_sentences} / "
                        f"{ref.offsets[-1]} in the CPU fp32 cache")
        return {}
    ids, ref_ids = np.asarray(cache._ids), np.asarray(ref._ids)
    lp, ref_lp = np.asarray(cache._lprobs, dtype=np.float32), np.asarray(ref._lprobs, dtype=np.float32)
    agree = float((ids[:, 0] == ref_ids[:, 0]).mean())
    diff = float(np.abs(lp[:, 0] - ref_lp[:, 0]).max())
    floor = 1.0 if args.dry_run else 0.98
    if agree < floor:
        failures.append(f"top1 agreement {agree:.4f} below {floor}")
    return {"sentences": int(cache.num_sentences), "tokens": int(cache.offsets[-1]), "top1_agreement": agree,
            "max_abs_top1_lprob_diff": diff, "floor": floor, "precision": cache.header["teacher_precision"]}


def loss_configs(dry: bool):
    """(name, device, student mode, teacher precision, tolerance class) of the one-batch comparison;
    the first is the reference."""
    if dry:
        return [("cpu_fp32", "cpu", "fp32", "fp32", None), ("cpu_fp32_again", "cpu", "fp32", "fp32", "same computation"),
                ("cpu_teacher_bf16", "cpu", "fp32", "bf16", "half precision")]
    return [("cpu_fp32", "cpu", "fp32", "fp32", None), ("cuda_fp32", "cuda", "fp32", "fp32", "fp32"),
            ("cuda_fp16_teacher_auto", "cuda", "fp16", "auto", "half precision"),
            ("cuda_amp_teacher_auto", "cuda", "amp", "auto", "half precision"),
            ("cuda_fp32_teacher_fp16", "cuda", "fp32", "fp16", "half precision"),
            ("cuda_fp32_teacher_bf16", "cuda", "fp32", "bf16", "half precision")]


def internal_loss_compare(args, sizes: Sizes, failures: list) -> dict:
    """Each criterion's loss terms and gradient norm on one fixed batch and one fixed student, in
    every configuration of :func:`loss_configs`, against the CPU fp32 values."""
    import torch
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import fairseq_kd  # noqa: F401
    from fairseq_kd import losses

    torch.set_num_threads(args.cpu_threads)
    plan = Plan(args, sizes)

    def parse(criterion, precision, device):
        argv = plan.student_train("loss_compare", criterion, "fp32", precision)
        argv = [a for a in argv if a != "--cpu"] + (["--cpu"] if device == "cpu" else [])
        if "--student-init" in argv:  # one fixed random student for every criterion
            argv[argv.index("--student-init") + 1] = "none"
        return convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))

    student_state, values, worst, chunks = None, {}, {}, {}
    for name, device_name, student_mode, precision, tolerance in loss_configs(args.dry_run):
        device = torch.device(device_name)
        cfgs = {c: parse(c, precision, device_name) for c in CRITERIA}
        task = tasks.setup_task(cfgs["hybrid_kd"].task)  # the teacher and the teacher's translations
        task.load_dataset("train")
        torch.manual_seed(1)
        student = task.build_model(cfgs["hybrid_kd"].model)
        if student_state is None:
            student_state = {k: v.clone() for k, v in student.state_dict().items()}
        student.load_state_dict(student_state)
        student.eval()  # no dropout: one deterministic loss per configuration
        # the batch with the most target positions: several loss chunks on CPU and on CUDA
        batch = max(task.get_batch_iterator(task.dataset("train"), max_tokens=sizes.max_tokens, seed=1,
                                            required_batch_size_multiple=1).next_epoch_itr(shuffle=False),
                    key=lambda b: (b["target"].numel(), b["id"][0].item()))
        student.to(device)
        if student_mode == "fp16":
            student.half()
        if device.type == "cuda":
            batch = utils.move_to_cuda(batch, device=device)
        positions, vocab = batch["target"].numel(), len(task.target_dictionary)
        chunks[name] = math.ceil(positions / losses._chunk_rows(vocab, device))
        for criterion in CRITERIA:
            crit = task.build_criterion(cfgs[criterion].criterion).to(device)
            if student_mode == "fp16":
                crit.half()
            student.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=student_mode == "amp"):
                loss, sample_size, logging = crit(student, batch)
            (loss.float() / sample_size).backward()
            grad = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in student.parameters() if p.grad is not None))
            terms = {k: float(v) for k, v in logging.items() if k.endswith("loss")}
            terms["loss"], terms["grad_norm"] = float(loss), float(grad)
            values.setdefault(criterion, {})[name] = terms
            bad = [k for k, v in terms.items() if not math.isfinite(v)]
            if bad:
                failures.append(f"{criterion} {name}: {', '.join(bad)} not finite")
            if tolerance is None:
                continue
            reference = values[criterion][loss_configs(args.dry_run)[0][0]]
            rel = {k: abs(v - reference[k]) / max(abs(reference[k]), 1.0) for k, v in terms.items() if k in reference}
            limit = LOSS_TOLERANCES[tolerance]
            entry = worst.setdefault(name, {"max_rel_diff": 0.0, "tolerance": limit, "where": None})
            term, diff = max(rel.items(), key=lambda kv: kv[1])
            if diff >= entry["max_rel_diff"]:
                entry.update(max_rel_diff=diff, where=f"{criterion} {term}")
            if diff > limit:
                failures.append(f"{criterion} {name}: {term} differs from cpu_fp32 by {diff:.2e} (relative), "
                                f"over the tolerance {limit:.0e}")
        del task, student
    if max(chunks.values()) < 2:
        failures.append(f"the batch fits one loss chunk everywhere ({chunks}): the chunked path was not exercised")
    return {"worst": worst, "chunks": chunks, "positions": positions, "vocab": vocab, "values": values,
            "rule": "|x - cpu_fp32| <= tolerance * max(|cpu_fp32|, 1) for every logged loss term and the gradient norm"}


INTERNAL = {"data": internal_data, "compare_distill_data": internal_compare_distill_data,
            "compare_cache": internal_compare_cache, "loss_compare": internal_loss_compare}


if __name__ == "__main__":
    main()
