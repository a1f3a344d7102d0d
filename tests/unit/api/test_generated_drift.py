"""The committed gRPC code is exactly what scripts/gen_proto.py makes from proto/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[3]
GENERATED = ROOT / "service" / "api" / "generated"


def files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    fresh = tmp_path / "generated"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(fresh)],
        check=True,
        capture_output=True,
    )
    committed, regenerated = files(GENERATED), files(fresh)
    assert sorted(committed) == sorted(regenerated), "files added or removed: run `make proto`"
    stale = [name for name in committed if committed[name] != regenerated[name]]
    assert not stale, f"stale generated code, run `make proto`: {stale}"
