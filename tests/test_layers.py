"""decoding/ never imports gRPC or generated protobuf code; service/ never imports torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("decoding", ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "google.rpc",
                   "google.protobuf", "service")),
     ("service", ("torch", "transformers"))],
)
def test_layers_stay_clean(package: str, forbidden: tuple[str, ...]) -> None:
    assert offenders(package, forbidden) == []


def test_the_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom grpc import aio\n")
    assert {"torch", "grpc"} <= imported_modules(bad)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("from service._proto import x\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert offenders("pkg", ("service",)) == ["pkg/m.py imports service._proto"]
    finally:
        ROOT = saved
