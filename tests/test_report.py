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


def test_gap_closed_is_the_share_of_the_teachers_lead():
    # teacher 30, baseline 20, student 27.5: it recovers 7.5 of the 10 points, 75%; a student below
    # its baseline closes a negative share
    assert report.gap_closed(30.0, 20.0, 27.5) == pytest.approx(0.75)
    assert report.gap_closed(30.0, 20.0, 18.0) == pytest.approx(-0.2)


def test_gap_closed_is_undefined_without_a_lead():
    assert report.gap_closed(20.0, 20.0, 21.0) is None
    assert report.gap_closed(19.0, 20.0, 21.0) is None


def test_speed_up_is_against_the_teachers_fairseq_speed():
    assert report.speed_up_cell({"1": 150.0}, {"1": 30.0}, "1") == "5.0x"
    assert report.speed_up_cell({}, {"1": 30.0}, "1") == "n/a"
