"""Shared pieces of the chart tests: paths, values files and a parsed rendering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "tandem"
ALL_ON_VALUES = CHART_DIR / "ci" / "all-on-values.yaml"
BAD_VALUES_DIR = Path(__file__).resolve().parent / "values"

RELEASE = "tandem"
NAMESPACE = "inference"


def load_values(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text())
    assert isinstance(values, dict), path
    return values


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base`` (how Helm layers values files)."""
    out = json.loads(json.dumps(base))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


class Rendered:
    """One rendering of the chart: the templates' text and the parsed objects."""

    def __init__(self, templates: dict[str, str]) -> None:
        self.templates = templates
        self.notes = next((t for name, t in templates.items() if name.endswith("NOTES.txt")), "")
        self.objects: list[dict[str, Any]] = []
        for name, text in sorted(templates.items()):
            if name.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    self.objects.append(doc)

    def as_stream(self) -> str:
        """The output as ``helm template`` prints it."""
        parts = []
        for name, text in sorted(self.templates.items()):
            if name.endswith("NOTES.txt") or not text.strip():
                continue
            parts.append(f"---\n# Source: {name}\n{text.strip()}\n")
        return "".join(parts)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def server(self) -> dict[str, Any]:
        containers = {c["name"]: c for c in self.pod["containers"]}
        return containers["tandem"]

    def env(self, container: dict[str, Any] | None = None) -> dict[str, Any]:
        """name -> value (or the valueFrom dict) of a container's environment."""
        items = (container or self.server).get("env", [])
        names = [e["name"] for e in items]
        assert len(names) == len(set(names)), f"duplicate env names: {names}"
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in items}


VALUE_SETS = {
    "default": {},
    "all-on": load_values(ALL_ON_VALUES),
}
"""The values the chart is linted, rendered and validated with: its defaults, and every
optional part on (ci/all-on-values.yaml, the chart-testing convention)."""
