"""docs/architecture.md names every module of the package and every batch key, so that the map of
the code cannot fall behind it unnoticed."""

import re
from pathlib import Path

from fairseq_kd.data import batch_keys

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")


def module_table_names():
    """Every file name in the module table's first column (a cell may name several)."""
    rows = [line.split("|")[1] for line in DOC.splitlines() if line.startswith("| `")]
    return {name for cell in rows for name in re.findall(r"`([\w/]+\.py|[\w]+/)`", cell)}


def test_every_module_is_in_the_table():
    named = module_table_names()
    for path in sorted((REPO / "fairseq_kd").rglob("*.py")):
        relative = path.relative_to(REPO / "fairseq_kd")
        if path.name == "__init__.py" and relative.parent != Path("."):
            continue  # a subpackage's empty __init__
        candidates = {f"fairseq_kd/{relative}", str(relative), path.name, f"{relative.parts[0]}/"}
        assert candidates & named, f"docs/architecture.md does not name fairseq_kd/{relative}"


def test_every_batch_key_is_described():
    keys = [value for name, value in vars(batch_keys).items() if name.isupper()]
    assert len(keys) == 5
    for key in keys:
        assert f"| `{key}` |" in DOC, key
