#!/usr/bin/env python3
"""Sweep the top-k encode kernel's tuning constants on a GPU, each configuration checked bit for bit.

For every combination of `--subs` (values per step of the compaction pass, `kernels.topk._SUB`),
`--caps` (the least number of candidate slots per program, `kernels.topk._MIN_CAP`), `--warps`
(num_warps of the encode kernel) and `--maxnreg` (its register cap, Triton's `maxnreg`), on the same
random normal input and residual:

- exact: the payload and the new residual equal, bit for bit, what the plain-PyTorch reference
  (`TopKCodec.encode_reference`) gives for the same input on the same GPU;
- ms: median of `--repeats` timed calls of `swarm.kernels.topk.encode` (the fused path: the residual
  is read and a new one written to another tensor, the value check runs in the pass; includes the one
  host sync that reads the error flag), CUDA events, after 3 warm-ups;
- programs: the persistent grid `kernels.topk.encode` launched (programs resident on the GPU at once,
  from the compiled kernel's registers: a register cap shows here);
- input_gbps: fp32 input bytes per second; hbm_gbps: the bytes the kernel must move (x and the
  residual read, the new residual and the payload written) per second; fraction_of_hbm against
  `--hbm-gbps`; vs_reference: the reference's time over the kernel's.

The configuration the kernel ships with is marked `default`. The best exact configuration is reported
under `best`. Nothing is changed on disk: the constants are set in this process only.

    python3 scripts/sweep_topk_kernel.py --json --numel 1073741824 --hbm-gbps 4800
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Any

import torch
from bench_codecs import time_cuda  # scripts/ is on the path when a script in it runs

from swarm.compression import ErrorFeedback, TopKCodec


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--numel", type=int, default=1 << 30, help="elements of the input (default 2**30)")
    p.add_argument("--chunk", type=int, default=4096, help="chunk size (default 4096, as sparseloco)")
    p.add_argument("--k", type=int, default=64, help="entries kept per chunk (default 64, as sparseloco)")
    p.add_argument("--bits", type=int, default=2, help="value bits (default 2, as sparseloco)")
    p.add_argument("--subs", type=_ints, default=[256, 512, 1024, 2048], help="compaction step sizes to try")
    p.add_argument("--caps", type=_ints, default=[256, 512, 1024], help="least candidate slots to try")
    p.add_argument("--warps", type=_ints, default=[4], help="num_warps values to try")
    p.add_argument(
        "--maxnreg",
        type=_ints,
        default=[0],
        help="register caps of the encode kernel to try (Triton's maxnreg; 0: the compiler's choice)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (default 5)")
    p.add_argument("--hbm-gbps", type=float, default=4800.0, help="the GPU's memory bandwidth (H200: 4800)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_topk_kernel: needs a CUDA GPU", file=sys.stderr)
        return 2
    from swarm.kernels import topk  # needs triton and a GPU

    n, chunk, k, bits = args.numel, args.chunk, args.k, args.bits
    g = torch.Generator(device="cuda").manual_seed(args.seed)
    x = torch.randn(n, device="cuda", generator=g)
    residual = 0.1 * torch.randn(n, device="cuda", generator=g)
    codec = TopKCodec(chunk=chunk, k=k, bits=bits)

    fb = ErrorFeedback(residual=residual.clone())
    ref_payload = codec.encode_reference(x, fb)
    ref_residual = fb.residual
    ref_s = time_cuda(lambda: codec.encode_reference(x, ErrorFeedback(residual=residual)), args.repeats)
    nbytes = topk.payload_nbytes(n, chunk=chunk, k=k, bits=bits)
    moved = 12 * n + nbytes  # x and residual read, new residual and payload written

    options = topk._encode_options()
    defaults = (
        topk._SUB,
        topk._MIN_CAP,
        options["num_warps"],
        options.get("maxnreg", 0),
    )
    original_options = topk._encode_options
    grids: list[int] = []
    original_resident = topk.resident_programs

    def resident(*a: Any, **kw: Any) -> int:
        grids.append(original_resident(*a, **kw))
        return grids[-1]

    topk.resident_programs = resident  # records each configuration's persistent grid (programs resident at once)
    rout = torch.empty_like(x)
    out = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rows: list[dict[str, Any]] = []
    try:
        for setting in itertools.product(args.subs, args.caps, args.warps, args.maxnreg):
            sub, cap, warps, maxnreg = setting
            if sub > chunk or cap > chunk or cap < 2 * k:
                continue
            topk._SUB, topk._MIN_CAP = sub, cap
            launch = {"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})}
            topk._encode_options = lambda o=launch: o  # type: ignore[misc]
            row: dict[str, Any] = {
                "sub": sub,
                "min_cap": cap,
                "warps": warps,
                "maxnreg": maxnreg,
                "default": setting == defaults,
            }
            try:
                rout.fill_(float("nan"))
                topk.encode(x, residual, chunk=chunk, k=k, bits=bits, out=out, residual_out=rout)
                row["exact"] = bool(torch.equal(out, ref_payload) and torch.equal(rout, ref_residual))
                s = time_cuda(
                    lambda: topk.encode(x, residual, chunk=chunk, k=k, bits=bits, out=out, residual_out=rout),
                    args.repeats,
                )
            except Exception as e:  # noqa: BLE001 - a configuration Triton cannot compile is a result, not a crash
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                continue
            row.update(
                programs=grids[-1],
                ms=round(s * 1e3, 3),
                input_gbps=round(4 * n / s / 1e9, 1),
                hbm_gbps=round(moved / s / 1e9, 1),
                fraction_of_hbm=round(moved / s / 1e9 / args.hbm_gbps, 3),
                vs_reference=round(ref_s / s, 2),
            )
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        topk._SUB, topk._MIN_CAP = defaults[0], defaults[1]
        topk._encode_options = original_options  # type: ignore[misc]
        topk.resident_programs = original_resident
    exact = [r for r in rows if r.get("exact")]
    report = {
        "config": {
            "numel": n,
            "chunk": chunk,
            "k": k,
            "bits": bits,
            "repeats": args.repeats,
            "hbm_gbps": args.hbm_gbps,
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
        },
        "reference_ms": round(ref_s * 1e3, 3),
        "rows": rows,
        "best": min(exact, key=lambda r: r["ms"]) if exact else None,
        "default": next((r for r in rows if r["default"]), None),
        "all_exact": all(r.get("exact") for r in rows),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for r in rows:
            print(r)
        print("best:", report["best"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
