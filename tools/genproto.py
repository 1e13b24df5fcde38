"""Generates the Python code for protos/ into sdk/ (lmforge.v1.*_pb2 and *_pb2_grpc).

python tools/genproto.py            # write the generated files
python tools/genproto.py --check    # exit 1 when the committed files are stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "sdk"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "lmforge" / "v1").glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Runs grpc_tools.protoc with -Iprotos into out_root; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    pkg = out_root / "lmforge" / "v1"
    init = pkg / "__init__.py"
    if not init.exists():
        init.write_text(
            '"""Generated from protos/lmforge/v1 by tools/genproto.py; do not edit."""\n'
        )
    return sorted(p for p in pkg.iterdir() if p.name.endswith((".py", ".pyi")))


def stale_files() -> list[str]:
    """Names of generated files that differ from what protos/ generates now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            committed = OUT_ROOT / "lmforge" / "v1" / path.name
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(path.name)
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when generated code is stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated files (run python tools/genproto.py):", ", ".join(stale))
            return 1
        print("generated code is up to date")
        return 0
    for path in generate(OUT_ROOT):
        print("wrote", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
