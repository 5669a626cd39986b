"""Sparklines and the self-contained SVG chart of metrics over rounds."""

from __future__ import annotations

import base64
import math
import xml.etree.ElementTree as ET

import pytest

from infra.charts import BLOCKS, line_chart_svg, sparkline, svg_data_uri

SVG = "{http://www.w3.org/2000/svg}"


def test_sparkline_scales_from_lowest_to_highest_block() -> None:
    assert sparkline([0.0, 0.5, 1.0]) == BLOCKS[0] + BLOCKS[4] + BLOCKS[7]
    assert sparkline([2.3, 2.2, 2.0]) == BLOCKS[7] + BLOCKS[5] + BLOCKS[0]


def test_sparkline_shows_missing_and_non_finite_values_as_gaps() -> None:
    line = sparkline([0.1, None, 0.3, math.nan, 0.2])

    assert len(line) == 5
    assert line[1] == " " and line[3] == " "
    assert line[0] == BLOCKS[0] and line[2] == BLOCKS[-1]


def test_sparkline_of_a_flat_empty_or_unknown_series() -> None:
    assert sparkline([0.4, 0.4, 0.4]) == BLOCKS[3] * 3
    assert sparkline([]) == ""
    assert sparkline([None, None]) == "  "


def test_sparkline_with_a_fixed_scale_clamps_outliers() -> None:
    assert sparkline([0.0, 1.0, 2.0], lo=0.0, hi=1.0) == BLOCKS[0] + BLOCKS[7] + BLOCKS[7]


def test_sparkline_averages_a_long_series_down_to_the_width() -> None:
    values = [float(i) for i in range(100)]

    line = sparkline(values, width=10)

    assert len(line) == 10
    assert line[0] == BLOCKS[0] and line[-1] == BLOCKS[-1]
    assert list(line) == sorted(line)  # still rising


def _tip(el: ET.Element) -> str | None:
    """The text of an element's <title> child (a tooltip in a browser)."""
    title = el.find(f"{SVG}title")
    return None if title is None else title.text


def _points(polyline: ET.Element) -> list[tuple[float, float]]:
    return [
        (float(x), float(y)) for x, y in (p.split(",") for p in polyline.attrib["points"].split())
    ]


def test_svg_draws_one_panel_per_series_with_gaps_for_missing_rounds() -> None:
    # Prepare: accuracy rises, round 2 was abandoned (no evaluation)
    series = {
        "test accuracy (%)": [10.4, 14.4, None, 24.0, 27.0],
        "test loss": [2.303, 2.214, None, 2.037, 2.055],
    }

    # Execute
    svg = line_chart_svg(series, title="cifar10-mobile <demo> & co")

    # Assert: valid XML, titled (escaped), one panel per series
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert _tip(root) == "cifar10-mobile <demo> & co"
    panels = root.findall(f"{SVG}g")
    assert [p.attrib["data-series"] for p in panels] == list(series)
    acc_lines = panels[0].findall(f"{SVG}polyline")
    # the missing round breaks the line in two: rounds 0-1 and 3-4
    assert [len(_points(line)) for line in acc_lines] == [2, 2]
    # accuracy rises, so its points climb (SVG y grows downwards)
    ys = [y for line in acc_lines for _, y in _points(line)]
    assert ys == sorted(ys, reverse=True)
    # x positions are shared across panels and increase with the round
    loss_xs = [x for line in panels[1].findall(f"{SVG}polyline") for x, _ in _points(line)]
    acc_xs = [x for line in acc_lines for x, _ in _points(line)]
    assert acc_xs == loss_xs == sorted(acc_xs)
    # every known point has a tooltip naming its round and value
    tips = [_tip(c) for c in panels[0].findall(f"{SVG}circle")]
    assert tips == ["round 0: 10.4", "round 1: 14.4", "round 3: 24", "round 4: 27"]


def test_svg_is_self_contained() -> None:
    svg = line_chart_svg({"loss": [1.0, 0.5]})

    lowered = svg.lower()
    for needle in ("<script", "href", "url(", "@import", "<image", "<foreignobject"):
        assert needle not in lowered


def test_svg_uses_given_rounds_and_formats() -> None:
    svg = line_chart_svg(
        {"acc": [0.5, 0.75]}, x=[3, 4], formats={"acc": lambda v: f"{100 * v:.0f}%"}
    )

    root = ET.fromstring(svg)
    tips = [_tip(c) for c in root.iter(f"{SVG}circle")]
    assert tips == ["round 3: 50%", "round 4: 75%"]
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "75%" in labels and "50%" in labels  # y axis: max and min
    assert "3" in labels and "4" in labels  # x axis: the rounds


def test_svg_of_a_flat_single_round_and_empty_series() -> None:
    one = ET.fromstring(line_chart_svg({"loss": [2.0]}))
    assert len(list(one.iter(f"{SVG}circle"))) == 1
    empty = ET.fromstring(line_chart_svg({"loss": [None, None]}))
    assert list(empty.iter(f"{SVG}polyline")) == []


def test_svg_refuses_series_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="'loss' has 1 values for 2 x"):
        line_chart_svg({"acc": [1.0, 2.0], "loss": [1.0]})


def test_svg_data_uri_round_trips() -> None:
    svg = line_chart_svg({"loss": [1.0, 0.5]})

    uri = svg_data_uri(svg)

    assert uri.startswith("data:image/svg+xml;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]).decode() == svg
