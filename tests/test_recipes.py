"""Every recipe under examples/ run end to end at SCALE=tiny (a slice of the shipped Multi30k, tiny
models, tens of updates), so that none of their commands can rot: each must produce its results
table and plot with one row per student method, every BLEU parsed, and every output counted."""

import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every recipe end to end: minutes

REPO = Path(__file__).resolve().parents[1]
EVAL_LINES, TRAIN_LINES, SPEED_LINES = 30, 300, 10  # recipe_lib.sh's tiny defaults
TESTS = ["test_2016_flickr", "test_2017_flickr"]

# one recipe runs two seeds per student, to check their mean and spread
SEEDS = {"paracrawl-en-fr": "1 2"}
# one recipe runs two steps at a time, to check run_plan.py's scheduling on a real plan
JOBS = {"ted-de-en": "2"}

# recipe -> (target language, its student methods in order); the longest first, for the two workers
RECIPES = {
    "wmt21-de-en": ("en", ["slim1x1_gold", "slim1x1_hybrid", "slim3x3_gold", "slim3x3_hybrid"]
                    + [f"slim3x3_word_T{t}" for t in ("0.5", "1", "2", "5", "10")]
                    + ["wide1x1_gold", "wide1x1_hybrid", "wide3x3_gold", "wide3x3_hybrid"]),
    "multi30k-en-de": ("de", ["baseline", "word_kd", "seq_kd", "seq_kd_interp", "base_kd", "hybrid_kd",
                              "triple_loss", "layer_init", "low_data", "seq_kd_then_gold"]),
    "multi30k-en-fr": ("fr", ["baseline", "word_kd", "seq_kd", "seq_kd_interp", "base_kd", "hybrid_kd",
                              "triple_loss", "layer_init", "low_data", "seq_kd_then_gold"]),
    "paracrawl-en-fr": ("fr", ["baseline", "seq_kd", "seq_kd_then_gold", "gold_then_seq_kd"]),
    "ted-de-en": ("en", ["base", "kd", "base_kd", "best2"]),
}


def run_recipe(name, work):
    start = time.time()
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / name / "recipe.sh")],
        env=dict(os.environ, SCALE="tiny", WORK=str(work), SEEDS=SEEDS.get(name, "1"), JOBS=JOBS.get(name, "1"),
                 PYTHON=sys.executable,
                 PYTHONWARNINGS="ignore"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
    )
    return proc, time.time() - start


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """Run every recipe, two at a time (one thread each, on two cores); name -> (work dir, process)."""
    root = tmp_path_factory.mktemp("recipes")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_recipe, name, root / name) for name in RECIPES}
    results = {}
    for name, future in futures.items():
        proc, seconds = future.result()
        print(f"{name}: {seconds:.0f} s")
        results[name] = (root / name, proc)
    return results


def finished(recipes, name):
    work, proc = recipes[name]
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-5000:]}"
    return work


def count_lines(path):
    return len(Path(path).read_text(encoding="utf-8").splitlines())


@pytest.mark.parametrize("name", RECIPES)
def test_table_and_plot_have_every_student(recipes, name):
    work = finished(recipes, name)
    students = RECIPES[name][1]
    results = json.loads((work / "results.json").read_text())
    assert list(results["models"]) == ["teacher"] + students
    # tiny scale writes the table and plot into the work directory, never into docs/
    table = (work / f"{name}.md").read_text()
    assert (work / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # past the header
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == ["teacher"] + students
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in table  # sacreBLEU's signature
    assert "bs:1000" in table  # the paired bootstrap's
    seeds = len(SEEDS.get(name, "1").split())
    # the settings that rerun it, quoted as a shell would need them
    settings = [line for line in table.splitlines() if line.startswith("Settings")]
    assert len(settings) == 1 and "SCALE=tiny" in settings[0]
    assert ("SEEDS='1 2'" if seeds > 1 else "SEEDS=1") in settings[0]
    for group_name, group in results["models"].items():
        assert group["parameters"] > 0
        assert set(group["speed"]) == {"1", "64"}, group_name
        assert set(group["ct2_speed"]) == {"1", "64"}, group_name  # the same model as CTranslate2 int8
        assert all(speed > 0 for speed in group["ct2_speed"].values())
        assert set(group["ct2_bleu"]) == set(TESTS) and all(0 <= b <= 100 for b in group["ct2_bleu"].values())
        assert all(f"{group['ct2_bleu'][test]:.2f}" in table for test in TESTS)
        assert len(group["runs"]) == (1 if group_name == "teacher" else seeds)
        for test in TESTS:
            bleu = group["bleu"][test]
            assert len(bleu["seeds"]) == len(group["runs"])
            assert isinstance(bleu["mean"], float) and 0 <= bleu["mean"] <= 100
            if len(bleu["seeds"]) > 1:
                assert f"{bleu['mean']:.2f} ± {bleu['std']:.2f}" in table
            else:
                assert bleu["std"] is None and f"{bleu['mean']:.2f}" in table
            if group_name not in ("teacher", group["baseline"]):
                assert 0 < group["p_value"][test] <= 1
                baseline = results["models"][group["baseline"]]["bleu"][test]["mean"]
                lead = results["models"]["teacher"]["bleu"][test]["mean"] - baseline
                expected = (bleu["mean"] - baseline) / lead if lead > 0 else None
                assert group["gap_closed"][test] == (pytest.approx(expected) if lead > 0 else None)
    teacher = results["models"]["teacher"]["parameters"]
    assert all(results["models"][s]["compression"] == round(teacher / results["models"][s]["parameters"], 2)
               for s in students)


@pytest.mark.parametrize("name", RECIPES)
def test_every_output_is_counted(recipes, name):
    work = finished(recipes, name)
    tgt = RECIPES[name][0]
    for split, lines in [("train", TRAIN_LINES), ("speed", SPEED_LINES)] + [(t, EVAL_LINES) for t in TESTS]:
        assert count_lines(work / "raw" / f"{split}.{tgt}") == lines
    with open(work / "models.tsv", encoding="utf-8") as f:
        models = list(csv.DictReader(f, delimiter="\t"))
    for model in models:
        for test in TESTS:
            assert count_lines(Path(model["dir"]) / f"{test}.hyp") == EVAL_LINES, (model["name"], test)
    assert json.loads((work / "speed.json").read_text())["sentences"] == SPEED_LINES
    for kd_dir in work.glob("kd*"):
        summary = json.loads((kd_dir / "train.kd.summary.json").read_text())
        per_source = 2 if summary["selection"] == "nbest-2" else 1
        assert summary["sentences"] == TRAIN_LINES
        assert summary["pairs_written"] == per_source * TRAIN_LINES


def test_a_finished_recipe_reruns_only_its_report(recipes):
    work = finished(recipes, "paracrawl-en-fr")
    proc, _ = run_recipe("paracrawl-en-fr", work)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ran = [line for line in proc.stdout.splitlines() if line.endswith(")") and "] running" in line]
    assert [line.split("]")[0] for line in ran] == ["[report"]


@pytest.mark.parametrize("name", RECIPES)
def test_speeds_are_the_median_of_rounds_in_turn(recipes, name):
    """Every model is timed SPEED_ROUNDS times (2 at tiny scale) in each engine; its speed is the
    median of its rounds (of two: their mean), and the table says how it was measured."""
    work = finished(recipes, name)
    speed = json.loads((work / "speed.json").read_text())
    # the teacher and the first seed of each student method
    assert speed["rounds"] == 2 and speed["models"] == ["teacher"] + [f"{m}-s1" for m in RECIPES[name][1]]
    for engine in (speed, speed["ct2"]):
        assert list(engine["sentences_per_second_by_round"]) == speed["models"]
        for model, by_batch in engine["sentences_per_second_by_round"].items():
            assert set(by_batch) == {"1", "64"}
            for batch, rounds in by_batch.items():
                assert len(rounds) == 2 and all(s > 0 for s in rounds)
                assert engine["sentences_per_second"][model][batch] == pytest.approx((rounds[0] + rounds[1]) / 2)
    assert "every model measured in the same run, 2 times in turn (round-robin)" in (work / f"{name}.md").read_text()


def test_a_rerun_with_models_added_measures_every_speed_again(recipes):
    """A speed.json that lacks a model of the plan (as after a rerun that adds one) is kept aside and
    every model is measured again in one run; a dry run only says so."""
    work = finished(recipes, "ted-de-en")
    speed = json.loads((work / "speed.json").read_text())
    speed["models"].remove("best2-s1")
    for engine in (speed, speed["ct2"]):
        for key in ("sentences_per_second", "sentences_per_second_by_round"):
            del engine[key]["best2-s1"]
    del speed["ct2"]["bleu"]["best2-s1"]
    old = json.dumps(speed)
    (work / "speed.json").write_text(old)
    env = dict(os.environ, SCALE="tiny", WORK=str(work), PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    recipe = ["bash", str(REPO / "examples" / "ted-de-en" / "recipe.sh")]
    proc = subprocess.run(recipe, env=dict(env, DRY_RUN="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"{work}/speed.json does not measure every model of this plan" in proc.stdout
    assert (work / "speed.json").read_text() == old and not list(work.glob("speed.before-*.json"))

    proc = subprocess.run(recipe, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    aside = list(work.glob("speed.before-*.json"))
    assert len(aside) == 1 and aside[0].read_text() == old
    assert f"kept as {aside[0]}, all are measured again" in proc.stdout
    ran = [line.split("]")[0] for line in proc.stdout.splitlines() if line.endswith(")") and "] running" in line]
    assert ran == ["[speed", "[report"]
    assert json.loads((work / "speed.json").read_text())["models"] == \
        ["teacher"] + [f"{m}-s1" for m in RECIPES["ted-de-en"][1]]
    assert "n/a" not in (work / "ted-de-en.md").read_text()


def test_a_dry_run_leaves_the_plan_and_model_list_alone(recipes):
    """A dry run beside a run of the same WORK (here: a finished one) with other settings prints
    its own plan and leaves the running plan's plan.tsv and models.tsv, read by its speed and report
    steps, as they were."""
    work = finished(recipes, "paracrawl-en-fr")
    kept = {name: (work / name).read_bytes() for name in ("plan.tsv", "models.tsv")}
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / "paracrawl-en-fr" / "recipe.sh")],
        env=dict(os.environ, SCALE="tiny", WORK=str(work), SEEDS="1 2 3", PYTHON=sys.executable, DRY_RUN="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "# train-baseline-s3 (to run;" in proc.stdout and "not written to WORK in a dry run" in proc.stdout
    assert {name: (work / name).read_bytes() for name in kept} == kept


def test_a_rerun_with_other_settings_is_refused(recipes):
    """The first run keeps its settings in WORK/settings.txt; a run or dry run in that WORK with others
    is refused before anything runs, naming each changed setting (more seeds only add models)."""
    work = finished(recipes, "paracrawl-en-fr")
    record = (work / "settings.txt").read_text()
    assert "\nMAX_TOKENS=1024\nLR=5e-3\n" in record and "\nSTUDENT_UPDATES=12\n" in record and "SEEDS" not in record
    timings = (work / "timings.tsv").read_text()
    for dry_run in ("1", "0"):
        proc = subprocess.run(
            ["bash", str(REPO / "examples" / "paracrawl-en-fr" / "recipe.sh")],
            env=dict(os.environ, SCALE="tiny", WORK=str(work), SEEDS="1 2 3", MAX_TOKENS="512", LR="1e-3",
                     PYTHON=sys.executable, DRY_RUN=dry_run),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
        )
        assert proc.returncode != 0
        assert (f"error: {work} was made with other settings: MAX_TOKENS=1024 (this run: 512) LR=5e-3 (this run: "
                f"1e-3); its finished steps would be kept") in proc.stdout, proc.stdout[-2000:]
        assert "] running" not in proc.stdout and "# train-" not in proc.stdout
    assert (work / "settings.txt").read_text() == record and (work / "timings.tsv").read_text() == timings


def test_local_data_is_required_at_full_scale(tmp_path):
    for name, variable in (("wmt21-de-en", "WMT21_DE_EN_DIR"), ("paracrawl-en-fr", "PARACRAWL_EN_FR_DIR"),
                           ("ted-de-en", "TED_DE_EN_DIR")):
        env = {k: v for k, v in os.environ.items() if k != variable}
        proc = subprocess.run(
            ["bash", str(REPO / "examples" / name / "recipe.sh")],
            env=dict(env, SCALE="full", WORK=str(tmp_path / name), PYTHON=sys.executable),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
        )
        assert proc.returncode != 0
        assert f"set {variable} to a directory holding train valid " in proc.stdout
        proc = subprocess.run(
            ["bash", str(REPO / "examples" / name / "recipe.sh")],
            env=dict(env, SCALE="full", WORK=str(tmp_path / name), PYTHON=sys.executable, **{variable: str(tmp_path)}),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
        )
        assert proc.returncode != 0
        assert f"{variable}={tmp_path} lacks: {tmp_path}/train." in proc.stdout
        assert not (tmp_path / name / "logs").exists()  # refused before running anything


COMPRESSION_SIZES = ["4x", "4x_deep_enc", "10x"]
COMPRESSION_METHODS = ["gold", "seq_kd", "seq_kd_then_gold", "seq_kd_interp", "hybrid_kd"]


def run_compression_study(work, **teacher):
    """STUDY=compression of the en-de recipe at tiny scale in ``work``, TEACHER=... from ``teacher``."""
    return subprocess.run(
        ["bash", str(REPO / "examples" / "multi30k-en-de" / "recipe.sh")],
        env=dict(os.environ, SCALE="tiny", STUDY="compression", WORK=str(work), PYTHON=sys.executable,
                 PYTHONWARNINGS="ignore", **teacher),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
    )


def teacher_of(work):
    return {"TEACHER": str(work / "teacher" / "checkpoint_best.pt"), "TEACHER_SPM": str(work / "spm" / "spm.model"),
            "TEACHER_DICT": str(work / "bin" / "dict.en.txt")}


def test_compression_study_reuses_a_teacher(recipes, tmp_path):
    """The compression study with TEACHER=the methods study's teacher: the data are binarized with
    its dictionary, the teacher is copied (so its translations are the methods study's, word for
    word), every size is trained with every method, and a work directory is refused for another
    teacher or for none."""
    methods_work = finished(recipes, "multi30k-en-de")
    work = tmp_path / "compression"
    proc = run_compression_study(work, **teacher_of(methods_work))
    assert proc.returncode == 0, proc.stdout[-5000:]

    students = [f"{size}.{method}" for size in COMPRESSION_SIZES for method in COMPRESSION_METHODS]
    results = json.loads((work / "results.json").read_text())
    assert list(results["models"]) == ["teacher"] + students
    assert all(results["models"][s]["baseline"] == s.split(".")[0] + ".gold" for s in students)
    assert (work / "multi30k-en-de-compression-given-teacher.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (work / "multi30k-en-de-compression.md").exists()  # the name of the recipe's own teacher's results
    assert (work / "bin" / "dict.en.txt").read_bytes() == (methods_work / "bin" / "dict.en.txt").read_bytes()
    assert (work / "teacher" / "checkpoint_best.pt").read_bytes() == \
        (methods_work / "teacher" / "checkpoint_best.pt").read_bytes()
    for test in TESTS:
        assert (work / "teacher" / f"{test}.hyp").read_text() == (methods_work / "teacher" / f"{test}.hyp").read_text()
    parameters = {size: results["models"][f"{size}.gold"]["parameters"] for size in COMPRESSION_SIZES}
    assert parameters["10x"] < parameters["4x"] < results["models"]["teacher"]["parameters"]
    # seq-KD then gold: fine-tuned at the study's constant FINETUNE_LR (the methods study: LR's schedule again)
    def learning_rates(log):
        return set(re.findall(r"\| lr ([0-9.e-]+) \|", log.read_text()))
    for size in COMPRESSION_SIZES:
        assert learning_rates(work / "logs" / f"train-{size}.seq_kd_then_gold-s1.log") == {"0.0001"}
    assert "0.0001" not in learning_rates(methods_work / "logs" / "train-seq_kd_then_gold-s1.log")
    assert "FINETUNE_LR=1e-4" in (work / "multi30k-en-de-compression-given-teacher.md").read_text()
    # each size's int8 speed: the median of its students (one architecture), against the teacher in fairseq
    table = (work / "multi30k-en-de-compression-given-teacher.md").read_text()
    teacher_speed = results["models"]["teacher"]["speed"]["1"]
    for size in COMPRESSION_SIZES:
        speeds = [results["models"][f"{size}.{method}"]["ct2_speed"]["1"] for method in COMPRESSION_METHODS]
        median = statistics.median(speeds)
        assert f"{size} {median:.1f} ({min(speeds):.1f}-{max(speeds):.1f}, {median / teacher_speed:.1f}x)" in table

    other = teacher_of(finished(recipes, "multi30k-en-fr"))
    proc = run_compression_study(work, **other)
    assert proc.returncode != 0
    assert f"{work}/spm comes from another teacher: its checkpoint, spm, dict" in proc.stdout
    proc = run_compression_study(work)
    assert proc.returncode != 0
    assert f"{work}/spm comes from the teacher {methods_work}/teacher/checkpoint_best.pt: set TEACHER" in proc.stdout


def test_an_imported_teachers_dictionary_must_fit_it(recipes, tmp_path):
    methods_work = finished(recipes, "multi30k-en-de")
    teacher = teacher_of(methods_work)
    short = tmp_path / "dict.txt"
    short.write_text("".join((methods_work / "bin" / "dict.en.txt").read_text().splitlines(True)[:-1]))
    work = tmp_path / "compression"
    proc = run_compression_study(work, **dict(teacher, TEACHER_DICT=str(short)))
    assert proc.returncode != 0
    rows = len((methods_work / "bin" / "dict.en.txt").read_text().splitlines()) + 4  # fairseq's 4 symbols
    assert f"the encoder has {rows} embeddings but {short} makes a dictionary of {rows - 1} entries" in proc.stdout
    assert not (work / "teacher").exists()


def test_compression_sizes_choose_the_students_and_their_order(tmp_path):
    proc = run_compression_study(tmp_path / "plan", DRY_RUN="1", COMPRESSION_SIZES="10x 4x 4x_deep_enc:hybrid_kd,gold")
    assert proc.returncode == 0, proc.stdout[-5000:]
    steps = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("# train-")]
    trained = [step.removeprefix("train-").removesuffix("-s1") for step in steps if step != "train-teacher"]
    assert trained == [f"{size}.{method}" for size in ("10x", "4x") for method in COMPRESSION_METHODS] + \
        ["4x_deep_enc.gold", "4x_deep_enc.hybrid_kd"]

    refusals = {
        "4x 5x": "no size '5x' (the sizes: 4x 4x_deep_enc 10x)",
        "4x:gold,kd": "4x: no method 'kd' (the methods: gold seq_kd seq_kd_then_gold seq_kd_interp hybrid_kd)",
        "10x:hybrid_kd": "10x: gold must be among its methods (the baseline of the others)",
        "4x:gold,seq_kd_then_gold": "4x: seq_kd_then_gold fine-tunes seq_kd, which must be among its methods",
    }
    for sizes, message in refusals.items():
        proc = run_compression_study(tmp_path / "refused", DRY_RUN="1", COMPRESSION_SIZES=sizes)
        assert proc.returncode != 0 and f"COMPRESSION_SIZES: {message}" in proc.stdout, (sizes, proc.stdout[-2000:])
