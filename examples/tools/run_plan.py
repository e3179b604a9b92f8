"""Run a recipe's plan: its steps in order, each skipped when its output exists.

    python run_plan.py WORK/plan.tsv [--dry-run]

recipe_lib.sh writes the plan, one step per line, tab-separated:

    NAME  OUTPUT  STDOUT  COMMAND (shell-quoted words)

A step runs COMMAND unless OUTPUT exists. COMMAND writes OUTPUT.partial (a file or a directory),
which is renamed to OUTPUT once the command succeeds, so an interrupted step leaves no OUTPUT and
runs again next time (fairseq-train and fairseq-kd-distill-data then resume from what they left
in OUTPUT.partial). OUTPUT "-" means: run every time (the report). With STDOUT 1, the command's
standard output is OUTPUT.partial itself (fairseq-generate's hypotheses); otherwise it goes to
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
import os
import runpy
import shlex
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import List, Optional

# Imported here, before any fork, so that every child starts with them loaded. Importing
# fairseq_cli.train also sends fairseq's log lines to standard output, for every step alike.
# torch._dynamo is what torch's optimizers import when the first one is built (over a second).
PRELOAD = (
    "fairseq_cli.train", "fairseq_cli.generate", "fairseq_cli.preprocess",
    "fairseq_kd", "fairseq_kd.cli.distill_data", "fairseq_kd.cli.init_student",
    "sentencepiece", "sacrebleu", "torch._dynamo",
)


@dataclass
class Step:
    name: str
    output: str  # "-": no output, run every time
    stdout_is_output: bool
    argv: List[str]


def read_plan(path: str) -> List[Step]:
    steps = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 4:
                sys.exit(f"{path}:{number}: expected 4 tab-separated fields, got {len(fields)}")
            name, output, stdout, command = fields
            steps.append(Step(name, output, stdout == "1", shlex.split(command)))
    names = [s.name for s in steps]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        sys.exit(f"{path}: step names used twice: {', '.join(duplicates)}")
    return steps


def console_script(name: str):
    """The function behind an installed console script, or None."""
    found = entry_points(group="console_scripts", name=name)
    return next(iter(found)).load() if found else None


def _child(argv: List[str], log_path: str, stdout_path: Optional[str]) -> int:
    """In the forked child: standard error (and output, unless ``stdout_path``) to the log, run ``argv``."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    out = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if stdout_path else log
    os.dup2(out, 1)
    os.dup2(log, 2)
    sys.argv = list(argv)
    if argv[0].endswith(".py"):
        runpy.run_path(argv[0], run_name="__main__")
        return 0
    main = console_script(argv[0])
    if main is None:
        raise SystemExit(f"{argv[0]}: neither an installed console script nor a .py file")
    result = main()
    return result if isinstance(result, int) else 0


def run_cli(argv: List[str], log_path: str, stdout_path: Optional[str] = None) -> int:
    """Run ``argv`` in a forked child, standard error appended to ``log_path``, standard output to
    ``stdout_path`` (truncated) or else to the log; return its exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            status = _child(argv, log_path, stdout_path)
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
    try:
        _, wait_status = os.waitpid(pid, 0)
    except KeyboardInterrupt:  # stop the child too (a terminal's Ctrl-C has signalled it already)
        os.kill(pid, signal.SIGINT)
        os.waitpid(pid, 0)
        raise
    return os.waitstatus_to_exitcode(wait_status)


def run_step(step: Step, work: str) -> None:
    log = os.path.join(work, "logs", f"{step.name}.log")
    partial = f"{step.output}.partial"
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(step.argv)}\n")
    print(f"[{step.name}] running (log: {log})", flush=True)
    start = time.time()
    try:
        status = run_cli(step.argv, log, partial if step.stdout_is_output else None)
    except KeyboardInterrupt:
        sys.exit(f"[{step.name}] interrupted; run the recipe again to resume")
    seconds = time.time() - start
    if status != 0:
        with open(log, encoding="utf-8", errors="replace") as f:
            tail = f.readlines()[-25:]
        sys.exit(f"[{step.name}] FAILED (exit status {status}); last lines of {log}:\n{''.join(tail)}")
    if step.output != "-":
        if not os.path.exists(partial):
            sys.exit(f"[{step.name}] succeeded but wrote no {partial}")
        os.replace(partial, step.output)
    with open(os.path.join(work, "timings.tsv"), "a", encoding="utf-8") as f:
        f.write(f"{step.name}\t{seconds:.1f}\n")
    print(f"[{step.name}] done in {seconds:.1f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="plan.tsv written by recipe_lib.sh")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    args = parser.parse_args()

    steps = read_plan(args.plan)
    work = os.path.dirname(os.path.abspath(args.plan))
    if args.dry_run:
        for step in steps:
            state = "done" if step.output != "-" and os.path.exists(step.output) else "to run"
            redirect = f" > {step.output}.partial" if step.stdout_is_output else ""
            python = "python " if step.argv[0].endswith(".py") else ""
            print(f"# {step.name} ({state})\n{python}{shlex.join(step.argv)}{redirect}")
        return
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    for module in PRELOAD:
        __import__(module)
    for step in steps:
        if step.output != "-" and os.path.exists(step.output):
            print(f"[{step.name}] skipped: {step.output} exists", flush=True)
            continue
        if os.path.isfile(f"{step.output}.partial"):
            os.remove(f"{step.output}.partial")  # a half-written file; directories are resumed
        run_step(step, work)
    print(f"all {len(steps)} steps done; timings in {os.path.join(work, 'timings.tsv')}")


if __name__ == "__main__":
    main()
