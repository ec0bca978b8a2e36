"""The examples run as written: a Hugging Face model trained with the hooks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.timeout(200)
def test_hf_llama_trains_with_the_hooks_and_members_stay_identical() -> None:
    pytest.importorskip("transformers", reason="the dev extra installs it; `pip install -e '.[dev]'`")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "hf_llama.py"), "--members", "2", "--steps", "40",
                           "--sync-every", "10"], check=False, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["members_identical"]
    assert all(loss < result["eval_loss_before"] - 1.0 for loss in result["eval_loss_after"])
