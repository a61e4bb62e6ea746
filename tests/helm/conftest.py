"""Fixtures of the chart tests: the chart loaded once per module and renderings of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import helm_python as helm
import pytest

from tests.helm.rendering import ALL_ON_VALUES, CHART_DIR, NAMESPACE, RELEASE, Rendered, load_values

Render = Callable[..., Rendered]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def render(chart: helm.Chart) -> Render:
    """Render the chart offline (what ``helm template`` does) with values over the defaults."""

    def _render(values: dict[str, Any] | None = None) -> Rendered:
        return Rendered(chart.render(values or {}, name=RELEASE, namespace=NAMESPACE))

    return _render


@pytest.fixture(scope="module")
def default(render: Render) -> Rendered:
    return render()


@pytest.fixture(scope="module")
def all_on(render: Render) -> Rendered:
    return render(load_values(ALL_ON_VALUES))
