#!/usr/bin/env python3
"""Sweep the int8 encode kernel's launch constants on a GPU, each configuration checked bit for bit.

For every combination of `--rows` (256-value blocks per program, `kernels.int8._ENCODE_ROWS`) and
`--warps` (its num_warps, `_ENCODE_WARPS`), on the same random normal input:

- exact: the payload equals, bit for bit, what the plain-PyTorch reference (`Int8Codec.encode_reference`)
  gives for the same input on the same GPU;
- ms: median of `--repeats` timed calls of `swarm.kernels.int8.encode` (includes its one host sync),
  CUDA events, after 3 warm-ups;
- input_gbps: fp32 input bytes per second; hbm_gbps: bytes moved (the input read, the payload
  written) per second; vs_reference: the reference's time over the kernel's.

The configuration the kernel ships with is marked `default`, the fastest exact one `best`. Nothing is
changed on disk: the constants are set in this process only.

    python3 scripts/sweep_int8_kernel.py --json --numel 1073741824
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any

import torch
from bench_codecs import time_cuda  # scripts/ is on the path when a script in it runs
from sweep_topk_kernel import _ints, add_timing, print_report

from swarm.compression.dense import Int8Codec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--numel", type=int, default=1 << 30, help="elements of the input (default 2**30)")
    p.add_argument("--rows", type=_ints, default=[2, 4, 8, 16], help="blocks per program to try")
    p.add_argument("--warps", type=_ints, default=[1, 2, 4, 8], help="num_warps values to try")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (default 5)")
    p.add_argument("--hbm-gbps", type=float, default=4800.0, help="the GPU's memory bandwidth (H200: 4800)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_int8_kernel: needs a CUDA GPU", file=sys.stderr)
        return 2
    from swarm.kernels import int8  # needs triton and a GPU

    n = args.numel
    x = torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(args.seed))
    codec = Int8Codec()
    ref_payload = codec.encode_reference(x)
    ref_s = time_cuda(lambda: codec.encode_reference(x), args.repeats)
    nbytes = int8.payload_nbytes(n)
    moved = 4 * n + nbytes
    defaults = (int8._ENCODE_ROWS, int8._ENCODE_WARPS)
    out = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rows: list[dict[str, Any]] = []
    try:
        for setting in itertools.product(args.rows, args.warps):
            blocks, warps = setting
            int8._ENCODE_ROWS, int8._ENCODE_WARPS = blocks, warps
            row: dict[str, Any] = {"rows": blocks, "warps": warps, "default": setting == defaults}
            try:
                out.zero_()
                int8.encode(x, out=out)
                row["exact"] = bool(torch.equal(out, ref_payload))
                s = time_cuda(lambda: int8.encode(x, out=out), args.repeats)
            except Exception as e:  # noqa: BLE001 - a configuration Triton cannot compile is a result, not a crash
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                continue
            add_timing(row, args, n=n, moved=moved, s=s, ref_s=ref_s, rows=rows)
    finally:
        int8._ENCODE_ROWS, int8._ENCODE_WARPS = defaults
    return print_report(args, {"numel": n}, ref_s, rows)


if __name__ == "__main__":
    raise SystemExit(main())
