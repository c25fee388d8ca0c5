"""wanalpha.demo_measures on synthetic clips, where the truth is known: the colour, shape and opacity measures."""

from __future__ import annotations

import numpy as np
import pytest

from wanalpha.data.synthetic import make_clip
from wanalpha.demo_measures import classify_colour, measure, named, summarise


def _single_objects(count: int, size: int = 48) -> list:
    """Clips with one opaque object (sharp or soft edges): the prompts the demo's measures are for."""
    clips, i = [], 0
    while len(clips) < count:
        clip = make_clip(np.random.default_rng([11, i]), 9, size, size)
        i += 1
        if "in front of" not in clip.caption and "semi-transparent" not in clip.caption:
            clips.append(clip)
    return clips


def test_measures_read_the_truth_of_synthetic_clips() -> None:
    rows = [measure(c.rgb, c.alpha, *named(c.caption)) for c in _single_objects(24)]
    summary = summarise(rows)
    assert summary["follows"] == 1.0, [r for r in rows if not r["follows"]]
    assert summary["alpha_max"] == 255 and summary["interior_opaque"] > 0.9 and summary["haze"] < 1


def test_measures_see_what_is_wrong() -> None:
    clip = _single_objects(1)[0]
    colour, shape = named(clip.caption)
    faint = measure(clip.rgb, clip.alpha // 2 + 20, colour, shape)  # the object at half opacity, a haze around it
    assert faint["alpha_max"] < 160 and faint["interior_opaque"] == 0 and faint["haze"] >= 20
    other = "blue" if colour != "blue" else "red"
    assert not measure(clip.rgb, clip.alpha, other, shape)["follows"]
    empty = measure(clip.rgb, np.zeros_like(clip.alpha), colour, shape)
    assert empty["colour_seen"] is None and empty["shape_seen"] is None and not empty["follows"]


@pytest.mark.parametrize(
    ("rgb", "name"), [((230, 230, 235), "white"), ((250, 215, 40), "yellow"), ((40, 80, 220), "blue")]
)
def test_colour_names(rgb, name) -> None:
    assert classify_colour(np.array([rgb] * 5, np.uint8)) == name


def test_named_reads_the_caption_grammar() -> None:
    assert named("a yellow triangle with soft edges moving up") == ("yellow", "triangle")
    assert named("a semi-transparent cyan square, transparent background") == ("cyan", "square")
    assert named("a dog running") == (None, None)
