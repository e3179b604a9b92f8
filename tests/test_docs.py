"""Every option the plugin adds is documented on its page in docs/ (the flags fairseq itself defines
are documented by fairseq)."""

import dataclasses
import os

import pytest
from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
from fairseq.tasks import TASK_DATACLASS_REGISTRY
from fairseq.tasks.translation import TranslationConfig

import fairseq_kd  # noqa: F401  (registers the criterions and the task)
from fairseq_kd.cli import cache_teacher, distill_data, export_ct2, init_student

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
CRITERION_PAGES = {"word_kd": "word-kd.md", "seq_kd_interp": "seq-kd.md", "hybrid_kd": "seq-kd.md",
                   "triple_loss": "triple-loss.md"}
TOOL_PAGES = [(cache_teacher, "teacher-cache.md"), (distill_data, "distill-data.md"), (init_student, "student-init.md"),
              (export_ct2, "export-ct2.md")]


def page(name: str) -> str:
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


def own_flags(config_class, inherited=()) -> list:
    """``--flag`` of each field of a fairseq dataclass config that is neither inherited nor taken from
    fairseq's global configuration (a ``${...}`` default, e.g. --sentence-avg)."""
    return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(config_class)
            if f.name != "_name" and f.name not in inherited and not str(f.default).startswith("${")]


def undocumented(flags, text) -> list:
    return [flag for flag in flags if f"`{flag}" not in text and f"{flag} " not in text]


@pytest.mark.parametrize("criterion", sorted(CRITERION_PAGES))
def test_every_criterion_option_is_on_its_page(criterion):
    flags = own_flags(CRITERION_DATACLASS_REGISTRY[criterion])
    assert flags
    assert undocumented(flags, page(CRITERION_PAGES[criterion])) == []


def test_every_task_option_is_documented():
    inherited = {f.name for f in dataclasses.fields(TranslationConfig)}
    flags = own_flags(TASK_DATACLASS_REGISTRY["translation_distill"], inherited)
    assert "--teacher-path" in flags and "--student-init" in flags
    pages = "".join(page(name) for name in set(CRITERION_PAGES.values()) | {"teacher-cache.md", "student-init.md"})
    assert undocumented(flags, pages) == []


@pytest.mark.parametrize("module,name", TOOL_PAGES, ids=[name for _, name in TOOL_PAGES])
def test_every_tool_option_is_on_its_page(module, name):
    flags = [s for action in module.get_parser()._actions for s in action.option_strings
             if s.startswith("--") and s != "--help"]
    assert len(flags) > 5
    assert undocumented(flags, page(name)) == []


def table_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("|")]


def assert_readme_quotes(results_page: str) -> None:
    """README holds, line for line, the table of ``docs/results/RESULTS_PAGE`` (written by a recipe)."""
    results = table_lines(page(os.path.join("results", results_page)))
    assert len(results) >= 4
    with open(os.path.join(DOCS, "..", "README.md"), encoding="utf-8") as f:
        readme = table_lines(f.read())
    assert results[0] in readme, f"README has no copy of the table of docs/results/{results_page}"
    # tables of one recipe family share their header: any table under that header may be the copy
    copies = [readme[i:i + len(results)] for i, line in enumerate(readme) if line == results[0]]
    assert results in copies, f"README's copy of the table of docs/results/{results_page} differs from it"


def test_readme_results_table_is_the_recipes_own():
    """README's results table is a copy of the one the Multi30k en-de recipe wrote (SCALE=full): a
    rerun that changes docs/results/multi30k-en-de.md must be copied over, never edited by hand."""
    assert_readme_quotes("multi30k-en-de.md")


def test_readme_demo_table_is_the_demos_own():
    """README's demo paragraph quotes the table `make demo` wrote (docs/results/demo-en-de.md)."""
    assert_readme_quotes("demo-en-de.md")


def test_readme_compression_table_is_the_studys_own():
    """README's compression results quote the table STUDY=compression wrote with the shared teacher
    (TEACHER=...: docs/results/multi30k-en-de-compression-given-teacher.md)."""
    assert_readme_quotes("multi30k-en-de-compression-given-teacher.md")
