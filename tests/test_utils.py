"""`swarm.utils`: the exit used by processes that ran a torch.distributed gloo group."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_exit_after_distributed_flushes_output_and_skips_finalization() -> None:
    # Finalization is what a gloo worker thread can abort (see the helper); atexit handlers run in
    # it, so one that never prints shows it was skipped, while buffered output still arrives.
    code = textwrap.dedent("""
        import atexit, logging, sys
        from swarm.utils import exit_after_distributed
        atexit.register(lambda: print("finalized", flush=True))
        logging.basicConfig(stream=sys.stderr, format="%(message)s")
        print("report", end="")
        logging.getLogger("t").warning("logged")
        sys.stderr.write("unflushed")
        exit_after_distributed(3)
        print("after")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 3
    assert proc.stdout == "report"
    assert proc.stderr == "logged\nunflushed"
