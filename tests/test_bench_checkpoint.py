"""scripts/bench_checkpoint.py on the tiny model: both sides timed, the restore on the committed hash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_checkpoint_bench_times_both_sides_and_restores_the_committed_hash(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_checkpoint.py"), "--model", "tiny",
                           "--repeat", "1", "--threads", "1", "--dir", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=100, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["restored_on_committed_hash"] and r["params"] == 133_440
    assert r["bytes_written"] > 4 * 4 * r["params"]  # θ, momentum and AdamW's two moments, fp32
    assert all(v > 0 for v in r["median_s"].values()) and r["ratio_write"] > 0 and r["ratio_resume"] > 0
    assert list(tmp_path.iterdir()) == []  # each repeat's files removed
