"""Run a recipe's plan: its steps, each skipped when its output exists.

    python run_plan.py WORK/plan.tsv [--jobs N] [--cores N] [--dry-run]

recipe_lib.sh writes the plan, one step per line, tab-separated:

    NAME  MAKES  STDOUT  THREADS  NEEDS  COMMAND (shell-quoted words)

MAKES is the step's output. NEEDS is what the step needs from earlier steps: shell-quoted paths,
each the MAKES of an earlier step or a path inside it (DIR/checkpoint_best.pt for DIR), and the
step waits for the steps that make them; "*" means every earlier step. A plan that needs a path no
earlier step makes is refused. THREADS is the number of threads the step computes with: its child
sets torch's threads and OMP_NUM_THREADS/MKL_NUM_THREADS to it before the command runs, and the
running steps' threads never add up to more than --cores (default: every core of the machine;
a step that wants more runs alone). Steps start in plan order as the steps they need finish, at
most --jobs at once; a step that is ready but does not fit in the free cores waits, and the steps
after it wait behind it, so that a wide step is not starved by narrow ones. When a step fails, no
new step starts, the running ones finish, and the run stops with the failure.

A step runs COMMAND unless MAKES exists. COMMAND writes MAKES.partial (a file or a directory),
which is renamed to MAKES once the command succeeds, so an interrupted step leaves no output and
runs again next time (fairseq-train and fairseq-kd-distill-data then resume from what they left
in MAKES.partial). MAKES "-" means: run every time (the report). With STDOUT 1, the command's
standard output is MAKES.partial itself (fairseq-generate's hypotheses); otherwise it goes to
WORK/logs/NAME.log, and standard error always does. Each step's wall time is appended to
WORK/timings.tsv.

Commands run inside a child forked from this process, which imports fairseq, the plugin and the
text tools once: a CLI's own start (about 3 s of imports) would otherwise cost more than a tiny
step's work. A command is a console script (fairseq-train, fairseq-kd-distill-data, ...), called
through its entry point, or a path ending in .py, run as a script. The child has its own copy of
every module's state, so fairseq's process-wide state (the best validation loss remembered by
checkpoint_utils.save_checkpoint, metrics) never leaks from one step into the next.
"""

import argparse
import contextlib
import os
import runpy
import shlex
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Dict, List, Optional, Set

# Imported here, before any fork, so that every child starts with them loaded. Importing
# fairseq_cli.train also sends fairseq's log lines to standard output, for every step alike.
# torch._dynamo is what torch's optimizers import when the first one is built (over a second).
PRELOAD = (
    "fairseq_cli.train", "fairseq_cli.generate", "fairseq_cli.preprocess",
    "fairseq_kd", "fairseq_kd.cli.distill_data", "fairseq_kd.cli.init_student",
    "sentencepiece", "sacrebleu", "torch._dynamo",
)


EVERY_EARLIER_STEP = "*"


@dataclass
class Step:
    name: str
    output: str  # MAKES; "-": no output, run every time
    stdout_is_output: bool
    threads: int
    needs: List[str]  # paths, or [EVERY_EARLIER_STEP]
    argv: List[str]

    def done(self) -> bool:
        return self.output != "-" and os.path.exists(self.output)


def read_plan(path: str) -> List[Step]:
    steps = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 6 or not fields[3].isdigit() or int(fields[3]) < 1:
                sys.exit(f"{path}:{number}: expected 6 tab-separated fields, THREADS a positive number: {line!r}")
            name, output, stdout, threads, needs, command = fields
            steps.append(Step(name, output, stdout == "1", int(threads), shlex.split(needs), shlex.split(command)))
    names = [s.name for s in steps]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        sys.exit(f"{path}: step names used twice: {', '.join(duplicates)}")
    return steps


def makers(path: str, earlier: List[Step]) -> Set[str]:
    """The earlier steps whose output is ``path`` or a directory holding it."""
    return {s.name for s in earlier if s.output != "-" and (path == s.output or path.startswith(s.output + "/"))}


def dependencies(steps: List[Step]) -> Dict[str, Set[str]]:
    """For each step, the names of the earlier steps it must wait for (see NEEDS above); exits
    naming the first need that no earlier step makes."""
    needs = {}
    for i, step in enumerate(steps):
        earlier = steps[:i]
        if step.needs == [EVERY_EARLIER_STEP]:
            needs[step.name] = {s.name for s in earlier}
            continue
        needs[step.name] = set()
        for path in step.needs:
            found = makers(path, earlier)
            if not found:
                sys.exit(f"step {step.name} needs {path}, which no earlier step makes")
            needs[step.name] |= found
    return needs


def console_script(name: str):
    """The function behind an installed console script, or None."""
    found = entry_points(group="console_scripts", name=name)
    return next(iter(found)).load() if found else None


def use_threads(threads: int) -> None:
    """Compute with ``threads`` threads: torch's intra-op threads, and OpenMP's and MKL's in what the
    command starts (fairseq never sets them; fairseq-kd-distill-data's CTranslate2 engine takes
    torch's number)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _child(argv: List[str], threads: int, log_path: str, stdout_path: Optional[str]) -> int:
    """In the forked child: standard error (and output, unless ``stdout_path``) to the log,
    ``threads`` threads, run ``argv``."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    out = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if stdout_path else log
    os.dup2(out, 1)
    os.dup2(log, 2)
    use_threads(threads)
    sys.argv = list(argv)
    if argv[0].endswith(".py"):
        runpy.run_path(argv[0], run_name="__main__")
        return 0
    main = console_script(argv[0])
    if main is None:
        raise SystemExit(f"{argv[0]}: neither an installed console script nor a .py file")
    result = main()
    return result if isinstance(result, int) else 0


def start_cli(argv: List[str], threads: int, log_path: str, stdout_path: Optional[str] = None) -> int:
    """Run ``argv`` in a forked child with ``threads`` threads, standard error appended to
    ``log_path``, standard output to ``stdout_path`` (truncated) or else to the log; return the
    child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            status = _child(argv, threads, log_path, stdout_path)
        except SystemExit as stop:  # sys.exit(): None, a status, or a message (status 1)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
            status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except BaseException:  # the child must never return into the parent's code
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    return pid


class Runner:
    """Starts steps in forked children, at most ``jobs`` at once and their threads within
    ``cores``, and finishes them."""

    def __init__(self, work: str, jobs: int, cores: int):
        self.work, self.jobs, self.cores = work, jobs, cores
        self.running: Dict[int, tuple] = {}  # pid -> (step, start time)
        self.failure: Optional[str] = None

    def fits(self, step: Step) -> bool:
        """Whether ``step`` may start now: a job is free and its threads fit in the free cores (or
        nothing runs, for a step wider than the machine)."""
        busy = sum(running.threads for running, _ in self.running.values())
        return len(self.running) < self.jobs and (busy + step.threads <= self.cores or not self.running)

    def start(self, step: Step) -> None:
        log = os.path.join(self.work, "logs", f"{step.name}.log")
        partial = f"{step.output}.partial"
        if os.path.isfile(partial):
            os.remove(partial)  # a half-written file; directories are resumed
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {shlex.join(step.argv)}\n")
        print(f"[{step.name}] running (log: {log})", flush=True)
        pid = start_cli(step.argv, step.threads, log, partial if step.stdout_is_output else None)
        self.running[pid] = (step, time.time())

    def wait_one(self) -> Step:
        """Wait for a running step to end; record its result (or the first failure)."""
        pid, wait_status = os.wait()
        step, start = self.running.pop(pid)
        seconds = time.time() - start
        status = os.waitstatus_to_exitcode(wait_status)
        log = os.path.join(self.work, "logs", f"{step.name}.log")
        partial = f"{step.output}.partial"
        if status != 0:
            with open(log, encoding="utf-8", errors="replace") as f:
                tail = f.readlines()[-25:]
            self.failure = self.failure or f"[{step.name}] FAILED (exit status {status}); last lines of {log}:\n{''.join(tail)}"
            return step
        if step.output != "-":
            if not os.path.exists(partial):
                self.failure = self.failure or f"[{step.name}] succeeded but wrote no {partial}"
                return step
            os.replace(partial, step.output)
        with open(os.path.join(self.work, "timings.tsv"), "a", encoding="utf-8") as f:
            f.write(f"{step.name}\t{seconds:.1f}\n")
        print(f"[{step.name}] done in {seconds:.1f} s", flush=True)
        return step

    def stop_all(self) -> None:
        """Terminate the running steps and reap them. SIGTERM, not SIGINT: a recipe started in the
        background by a non-interactive shell ignores SIGINT, and so do the steps it forks."""
        for pid in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in list(self.running):
            os.waitpid(pid, 0)
        self.running.clear()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(steps: List[Step], needs: Dict[str, Set[str]], work: str, jobs: int, cores: int) -> None:
    """Run every step that is not done, each once the steps it ``needs`` are done, ``jobs`` at a
    time within ``cores`` threads."""
    finished = set()
    pending = []
    for step in steps:
        if step.done():
            print(f"[{step.name}] skipped: {step.output} exists", flush=True)
            finished.add(step.name)
        else:
            pending.append(step)
    runner = Runner(work, jobs, cores)
    signal.signal(signal.SIGTERM, _interrupt)  # a job scheduler's time limit: stop the steps too
    try:
        while pending or runner.running:
            ready = [s for s in pending if needs[s.name] <= finished] if runner.failure is None else []
            for step in ready:
                if not runner.fits(step):
                    break  # the steps after it wait behind it
                pending.remove(step)
                runner.start(step)
            if not runner.running:
                break  # nothing can start: a failure, or steps waiting on one that failed
            step = runner.wait_one()
            if runner.failure is None:
                finished.add(step.name)
    except KeyboardInterrupt:
        runner.stop_all()
        sys.exit("interrupted; run the recipe again to resume")
    if runner.failure:
        sys.exit(runner.failure)


def every_core() -> int:
    """The cores this process may run on (all of the machine's, unless its affinity is narrowed)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="plan.tsv written by recipe_lib.sh")
    parser.add_argument("--jobs", type=int, default=1, help="steps run at once (default 1)")
    parser.add_argument("--cores", type=int, default=every_core(),
                        help="bound on the running steps' threads together (default: every core, %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.cores < 1:
        parser.error(f"--cores must be at least 1, got {args.cores}")

    steps = read_plan(args.plan)
    needs = dependencies(steps)
    work = os.path.dirname(os.path.abspath(args.plan))
    if args.dry_run:
        for step in steps:
            state = "done" if step.done() else "to run"
            redirect = f" > {step.output}.partial" if step.stdout_is_output else ""
            python = "python " if step.argv[0].endswith(".py") else ""
            after = "every earlier step" if step.needs == [EVERY_EARLIER_STEP] else (
                ", ".join(s.name for s in steps if s.name in needs[step.name]) or "nothing"
            )
            threads = f"{step.threads} thread{'s' if step.threads > 1 else ''}"
            print(f"# {step.name} ({state}; {threads}; after {after})\n"
                  f"{python}{shlex.join(step.argv)}{redirect}")
        return
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    for module in PRELOAD:
        __import__(module)
    run(steps, needs, work, args.jobs, args.cores)
    print(f"all {len(steps)} steps done; timings in {os.path.join(work, 'timings.tsv')}")


if __name__ == "__main__":
    main()
