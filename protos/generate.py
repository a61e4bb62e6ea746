"""Regenerate the Python code for protos/ into service/_proto (``--check``: fail if stale).

    python protos/generate.py          # write
    python protos/generate.py --check  # CI: exit 1 when the committed code differs

protoc writes absolute imports (``from tandem.v1 import ...``); they are rewritten to live
under ``service._proto`` so no extra path entry is needed.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "service" / "_proto"
PACKAGE = "service._proto"


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
         f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos],
        check=True,
    )
    for path in out.rglob("*.py*"):
        text = re.sub(r"^from tandem\.", f"from {PACKAGE}.tandem.", path.read_text(), flags=re.M)
        path.write_text(text)
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


def _files(root: Path) -> list[Path]:
    return sorted(
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )


def same_tree(a: Path, b: Path) -> bool:
    files_a, files_b = _files(a), _files(b)
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when service/_proto is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_proto"
        fresh.mkdir()
        generate(fresh)
        if args.check:
            if OUT.exists() and same_tree(fresh, OUT):
                print("generated proto code is fresh")
                return 0
            print("service/_proto is stale: run `python protos/generate.py`", file=sys.stderr)
            return 1
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(fresh, OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
