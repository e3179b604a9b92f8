"""The results plot's label placement (examples/tools/report.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "tools"))
import report  # noqa: E402


def test_labels_of_close_points_are_pushed_apart_in_value_order():
    # 34.42 twice (two students with the same BLEU) and 34.25 just below, gap 0.2, by hand: 34.25
    # stays; the first 34.42 is only 0.17 above it, so it moves to 34.25 + 0.2 = 34.45; the second
    # 34.42 goes to 34.45 + 0.2 = 34.65; 36.89 is far enough above to stay.
    heights = report.label_heights([34.42, 36.89, 34.42, 34.25], gap=0.2)
    assert heights == pytest.approx([34.45, 36.89, 34.65, 34.25])


def test_labels_far_apart_stay_at_their_points():
    assert report.label_heights([1.0, 3.0, 2.0], gap=0.5) == [1.0, 3.0, 2.0]
