"""examples/tools/run_plan.py: which steps wait for which (the needs each step declares), running
them one or several at a time within a number of cores, each with its threads, with resumption and
failures, on plans of small Python scripts."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_PLAN = REPO / "examples" / "tools" / "run_plan.py"
sys.path.insert(0, str(RUN_PLAN.parent))
import run_plan  # noqa: E402

# run_plan.py as a command, preloading torch alone: the steps here are small scripts, and fairseq's
# imports (the real preload, which tests/test_recipes.py runs) would cost seconds a run
RUNNER = [sys.executable, "-c", "import sys, run_plan; run_plan.PRELOAD = ('torch',); run_plan.main()"]
RUNNER_ENV = dict(os.environ, PYTHONPATH=str(RUN_PLAN.parent))

# STEP.py OUT [INPUT...] [--sleep S] [--fail]: checks that every INPUT exists, logs start and end
# times to order.log, writes OUT.partial: "done", or with --threads the threads it computes with
# (torch's, OMP_NUM_THREADS, MKL_NUM_THREADS).
SCRIPT = """
import os, sys, time
args = sys.argv[1:]
fail = "--fail" in args
sleep = float(args[args.index("--sleep") + 1]) if "--sleep" in args else 0.0
paths = [a for a in args if not a.startswith("--") and not a.replace(".", "").isdigit()]
out, inputs = paths[0], paths[1:]
for path in inputs:
    assert os.path.exists(path), f"input {path} missing"
log = os.path.join(os.path.dirname(out), "order.log")
with open(log, "a") as f:
    f.write(f"start {os.path.basename(out)} {time.time()}\\n")
time.sleep(sleep)
if fail:
    sys.exit(3)
with open(out + ".partial", "w") as f:
    if "--threads" in args:
        import torch
        f.write(f"{torch.get_num_threads()} {os.environ['OMP_NUM_THREADS']} {os.environ['MKL_NUM_THREADS']}")
    else:
        f.write("done")
with open(log, "a") as f:
    f.write(f"end {os.path.basename(out)} {time.time()}\\n")
"""


def write_plan(work, steps):
    """steps: (name, needs, args[, threads]) with needs ("*" or paths) and args relative to work,
    the inputs among args; the output is work/name; one thread unless given."""
    script = work / "step.py"
    script.write_text(SCRIPT)
    lines = []
    for name, needs, args, *threads in steps:
        argv = [str(script), str(work / name)] + [a if a.startswith("--") or a[0].isdigit() else str(work / a) for a in args]
        needs = "*" if needs == "*" else shlex.join(str(work / path) for path in needs)
        lines.append("\t".join([name, str(work / name), "0", str(threads[0] if threads else 1), needs, shlex.join(argv)]))
    (work / "plan.tsv").write_text("\n".join(lines) + "\n")


def run(work, jobs=1, cores=None):
    cores = [] if cores is None else ["--cores", str(cores)]
    return subprocess.run([*RUNNER, str(work / "plan.tsv"), "--jobs", str(jobs), *cores], env=RUNNER_ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)


def events(work):
    rows = [line.split() for line in (work / "order.log").read_text().splitlines()]
    return [(kind, name, float(t)) for kind, name, t in rows]


def test_dependencies_from_declared_needs(tmp_path):
    write_plan(tmp_path, [
        ("data", [], []),
        ("data2", [], []),
        ("model", ["data/file"], []),              # a path under an earlier output
        ("model_b", ["data2"], ["data"]),          # "data" is a prefix of "data2", not its directory; and
                                                   # a path the command names is no need unless declared
        ("eval", ["model", "data2"], []),
        ("report", "*", []),
    ])
    needs = run_plan.dependencies(run_plan.read_plan(tmp_path / "plan.tsv"))
    assert needs == {
        "data": set(), "data2": set(), "model": {"data"}, "model_b": {"data2"},
        "eval": {"model", "data2"}, "report": {"data", "data2", "model", "model_b", "eval"},
    }


def test_a_need_that_no_earlier_step_makes_is_refused(tmp_path):
    write_plan(tmp_path, [("a", ["b"], []), ("b", [], [])])  # made, but later
    proc = run(tmp_path)
    assert proc.returncode != 0 and f"step a needs {tmp_path}/b, which no earlier step makes" in proc.stdout
    write_plan(tmp_path, [("a", [], []), ("b", ["a2"], [])])  # made by no step
    proc = run(tmp_path)
    assert proc.returncode != 0 and f"step b needs {tmp_path}/a2, which no earlier step makes" in proc.stdout
    assert not (tmp_path / "order.log").exists()  # refused before anything ran


def test_two_jobs_overlap_independent_steps_and_respect_order(tmp_path):
    write_plan(tmp_path, [
        ("a", [], ["--sleep", "1"]),
        ("b", [], ["--sleep", "1"]),
        ("c", ["a", "b"], ["a", "b"]),
        ("report", "*", []),
    ])
    proc = run(tmp_path, jobs=2)
    assert proc.returncode == 0, proc.stdout
    log = events(tmp_path)
    when = {(kind, name): t for kind, name, t in log}
    assert when[("start", "b")] < when[("end", "a")]  # a and b ran side by side
    assert when[("start", "c")] >= max(when[("end", "a")], when[("end", "b")])
    assert when[("start", "report")] >= when[("end", "c")]
    assert all((tmp_path / name).exists() for name in "abc")


def test_one_job_runs_in_plan_order(tmp_path):
    write_plan(tmp_path, [("a", [], []), ("b", [], []), ("c", ["a"], ["a"])])
    assert run(tmp_path).returncode == 0
    assert [name for kind, name, _ in events(tmp_path) if kind == "start"] == ["a", "b", "c"]


def test_failure_stops_new_steps_lets_running_finish_and_resume_skips_done(tmp_path):
    write_plan(tmp_path, [
        ("slow", [], ["--sleep", "1.5"]),
        ("bad", [], ["--fail"]),
        ("after_bad", ["bad"], ["bad"]),
        ("later", [], []),
    ])
    proc = run(tmp_path, jobs=2)
    assert proc.returncode != 0
    assert "[bad] FAILED (exit status 3)" in proc.stdout
    names_started = [name for kind, name, _ in events(tmp_path) if kind == "start"]
    assert "after_bad" not in names_started and "later" not in names_started
    assert (tmp_path / "slow").exists()  # the running step was allowed to finish

    # fix the failing step and rerun: only what is missing runs
    write_plan(tmp_path, [
        ("slow", [], ["--sleep", "1.5"]),
        ("bad", [], []),
        ("after_bad", ["bad"], ["bad"]),
        ("later", [], []),
    ])
    (tmp_path / "order.log").unlink()
    proc = run(tmp_path, jobs=2)
    assert proc.returncode == 0, proc.stdout
    assert "[slow] skipped" in proc.stdout
    assert sorted(name for kind, name, _ in events(tmp_path) if kind == "start") == ["after_bad", "bad", "later"]


def test_bad_plan_jobs_and_cores_refused(tmp_path):
    (tmp_path / "plan.tsv").write_text("a\tout\t0\tsome\t\techo\n")
    proc = run(tmp_path)
    assert proc.returncode != 0 and "expected 6 tab-separated fields, THREADS a positive number" in proc.stdout
    (tmp_path / "plan.tsv").write_text("a\tout\t0\t0\t\techo\n")
    assert "THREADS a positive number" in run(tmp_path).stdout
    write_plan(tmp_path, [("a", [], [])])
    proc = run(tmp_path, jobs=0)
    assert proc.returncode != 0 and "--jobs must be at least 1" in proc.stdout
    proc = run(tmp_path, cores=0)
    assert proc.returncode != 0 and "--cores must be at least 1" in proc.stdout


def test_running_steps_threads_stay_within_the_cores(tmp_path):
    """Three jobs, two cores: the two-thread step runs alone, the one-thread steps side by side."""
    write_plan(tmp_path, [("wide", [], ["--sleep", "1"], 2), ("a", [], ["--sleep", "1"]), ("b", [], ["--sleep", "1"])])
    proc = run(tmp_path, jobs=3, cores=2)
    assert proc.returncode == 0, proc.stdout
    when = {(kind, name): t for kind, name, t in events(tmp_path)}
    assert when[("start", "a")] >= when[("end", "wide")] and when[("start", "b")] >= when[("end", "wide")]
    assert when[("start", "b")] < when[("end", "a")]  # a and b ran side by side


def test_a_ready_step_that_does_not_fit_is_not_overtaken(tmp_path):
    """A wide step waits for cores, and the narrow steps after it in the plan wait behind it (else
    they could keep it from ever starting); a step wider than the machine runs alone."""
    write_plan(tmp_path, [
        ("first", [], ["--sleep", "1"]),
        ("wide", [], [], 2),
        ("narrow", [], []),
        ("wider_than_the_machine", [], ["--sleep", "0.5"], 3),
        ("last", [], []),
    ])
    proc = run(tmp_path, jobs=2, cores=2)
    assert proc.returncode == 0, proc.stdout
    when = {(kind, name): t for kind, name, t in events(tmp_path)}
    assert when[("start", "wide")] >= when[("end", "first")]
    assert when[("start", "narrow")] >= when[("end", "wide")]
    assert when[("start", "wider_than_the_machine")] >= when[("end", "narrow")]
    assert when[("start", "last")] >= when[("end", "wider_than_the_machine")]


def test_each_step_computes_with_its_threads(tmp_path):
    """The child sets torch's threads and OMP_NUM_THREADS/MKL_NUM_THREADS to the step's threads,
    whatever the runner started with."""
    write_plan(tmp_path, [("one", [], ["--threads"], 1), ("two", [], ["--threads"], 2)])
    proc = subprocess.run([*RUNNER, str(tmp_path / "plan.tsv"), "--jobs", "2", "--cores", "3"],
                          env=dict(RUNNER_ENV, OMP_NUM_THREADS="3", MKL_NUM_THREADS="3"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert (tmp_path / "one").read_text() == "1 1 1"
    assert (tmp_path / "two").read_text() == "2 2 2"


def test_dry_run_shows_each_steps_threads_and_needs(tmp_path):
    write_plan(tmp_path, [("data", [], []), ("model", ["data"], [], 2), ("report", "*", [])])
    proc = subprocess.run([*RUNNER, str(tmp_path / "plan.tsv"), "--dry-run"], env=RUNNER_ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert "# model (to run; 2 threads; after data)" in proc.stdout
    assert "# report (to run; 1 thread; after every earlier step)" in proc.stdout
    assert not (tmp_path / "data").exists()


def test_sigterm_to_the_runner_stops_its_steps(tmp_path):
    """A job scheduler's time limit signals the runner alone: its running steps must stop with it
    (and a step started in the background, where SIGINT is ignored, too)."""
    write_plan(tmp_path, [("a", [], ["--sleep", "60"]), ("b", [], ["--sleep", "60"])])
    proc = subprocess.Popen([*RUNNER, str(tmp_path / "plan.tsv"), "--jobs", "2"], env=RUNNER_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    log = tmp_path / "order.log"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) == 2):
        time.sleep(0.2)
    assert len(log.read_text().splitlines()) == 2  # both steps started
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], stdout=subprocess.PIPE, text=True).stdout.split()
    assert len(children) == 2
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "interrupted; run the recipe again to resume" in out
    for pid in children:
        assert not Path(f"/proc/{pid}").exists()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
