"""Shared fixtures: tiny model pairs on disk and engines over them (CPU, float32)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from decoding.adaptive import CostModel
from decoding.engine import Engine, EngineConfig
from decoding.models import ModelPair, load_pair
from tests.tiny_models import make_tiny_pair

# Fixed costs keep adaptive γ deterministic in tests: a draft step at a tenth of a target
# pass and a verify that grows slowly with width, as on a GPU.
TEST_COSTS = CostModel.from_widths(0.1, tuple(1.0 + 0.05 * k for k in range(9)))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "same": make_tiny_pair(root / "same", same=True),
        "different": make_tiny_pair(root / "different", same=False),
    }


@pytest.fixture(scope="session")
def same_pair(tiny_dirs) -> ModelPair:
    target, draft = tiny_dirs["same"]
    return load_pair(str(target), str(draft), device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def different_pair(tiny_dirs) -> ModelPair:
    target, draft = tiny_dirs["different"]
    return load_pair(str(target), str(draft), device="cpu", dtype="float32", progress=False)


def make_engine(pair: ModelPair, **config: object) -> Engine:
    return Engine(pair, EngineConfig(**config), costs=TEST_COSTS)  # type: ignore[arg-type]


@pytest.fixture
def engine(same_pair) -> Iterator[Engine]:
    engine = make_engine(same_pair, max_new_tokens_limit=256, default_max_new_tokens=32)
    yield engine
    engine.close()
