#!/usr/bin/env python3
"""Sweep the top-k encode kernel's tuning constants on a GPU, each configuration checked bit for bit.

For every combination of `--subs` (values per step of the compaction pass, `kernels.topk._SUB`),
`--caps` (the least number of candidate slots per program, `kernels.topk._MIN_CAP`), `--rows` (the
compaction pass's row width, `kernels.topk._ROW`: 0 scans each step as one vector), `--ranks` (the
lower bound on T is the least of the sets' rank-th largest values, `kernels.topk._SET_RANK`), `--warps`
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


def bound_stats(x: torch.Tensor, *, chunk: int, k: int, rank: int, cap: int) -> dict[str, float]:
    """How tight the encode's step-1 bound on T is for the chunks of `x` (whole chunks only).

    As `kernels.topk` computes it: `sets = max(k, _MIN_SETS) / rank` strided sets (index % sets), the least
    of the sets' rank-th largest |x| (each set's larger values dropped with their ties). Returns the
    mean and largest number of candidates (entries at or above the bound) per chunk and the fraction
    of chunks with more than `cap` of them, which need a search pass over the whole chunk.
    """
    from swarm.kernels import topk  # its constants only: no kernel runs, any device

    sets = max(1 << (k - 1).bit_length(), topk._MIN_SETS) // rank
    u = x[: x.numel() // chunk * chunk].abs().view(-1, chunk // sets, sets)
    m = u.amax(dim=1, keepdim=True)
    for _ in range(rank - 1):
        m = torch.where(u < m, u, -1.0).amax(dim=1, keepdim=True)
    lo = m.amin(dim=2, keepdim=True)
    cand = (u >= lo).sum(dim=(1, 2)).double()
    return {
        "rank": rank,
        "sets": sets,
        "mean_candidates": round(cand.mean().item(), 1),
        "max_candidates": int(cand.max().item()),
        "fraction_over_cap": round((cand > cap).double().mean().item(), 4),
    }


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
        "--ranks", type=_ints, default=[1], help="set ranks of the bound on T to try (kernels.topk._SET_RANK)"
    )
    p.add_argument(
        "--rows",
        type=_ints,
        default=[0],
        help="compaction row widths to try (kernels.topk._ROW; 0: one scan over each step's values)",
    )
    p.add_argument(
        "--maxnreg",
        type=_ints,
        default=[0],
        help="register caps of the encode kernel to try (Triton's maxnreg; 0: the compiler's choice)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (default 5)")
    p.add_argument("--hbm-gbps", type=float, default=4800.0, help="the GPU's memory bandwidth (H200: 4800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bound-only",
        action="store_true",
        help="only report how tight the step-1 bound on T is for each of --ranks at the least of --caps "
        "(normal input plus the residual, as the sweep's; torch on any device, no kernel)",
    )
    args = p.parse_args(argv)
    if args.bound_only:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator(device=device).manual_seed(args.seed)
        acc = torch.randn(args.numel, device=device, generator=g)
        acc += 0.1 * torch.randn(args.numel, device=device, generator=g)
        stats = [bound_stats(acc, chunk=args.chunk, k=args.k, rank=r, cap=min(args.caps)) for r in args.ranks]
        print(
            json.dumps({"numel": args.numel, "chunk": args.chunk, "k": args.k, "cap": min(args.caps), "bounds": stats})
        )
        return 0
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
        topk._ROW,
        topk._SET_RANK,
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
        for setting in itertools.product(args.subs, args.caps, args.rows, args.ranks, args.warps, args.maxnreg):
            sub, cap, row_width, rank, warps, maxnreg = setting
            if sub > chunk or cap > chunk or cap < 2 * k or row_width >= sub:
                continue
            topk._SUB, topk._MIN_CAP, topk._ROW, topk._SET_RANK = sub, cap, row_width, rank
            launch = {"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})}
            topk._encode_options = lambda o=launch: o  # type: ignore[misc]
            row: dict[str, Any] = {
                "sub": sub,
                "min_cap": cap,
                "row": row_width,
                "rank": rank,
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
            row["programs"] = grids[-1]
            add_timing(row, args, n=n, moved=moved, s=s, ref_s=ref_s, rows=rows)
    finally:
        topk._SUB, topk._MIN_CAP, topk._ROW, topk._SET_RANK = defaults[:4]
        topk._encode_options = original_options  # type: ignore[misc]
        topk.resident_programs = original_resident
    return print_report(args, {"numel": n, "chunk": chunk, "k": k, "bits": bits}, ref_s, rows)


def add_timing(
    row: dict[str, Any], args: argparse.Namespace, *, n: int, moved: int, s: float, ref_s: float, rows: list
) -> None:
    """Add a timed configuration's figures to `row` (n fp32 inputs, `moved` bytes in `s` seconds), keep it."""
    row.update(
        ms=round(s * 1e3, 4),
        input_gbps=round(4 * n / s / 1e9, 1),
        hbm_gbps=round(moved / s / 1e9, 1),
        fraction_of_hbm=round(moved / s / 1e9 / args.hbm_gbps, 3),
        vs_reference=round(ref_s / s, 2),
    )
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)


def print_report(args: argparse.Namespace, config: dict[str, Any], ref_s: float, rows: list[dict[str, Any]]) -> int:
    """Print a sweep's report (one JSON document with --json): its rows, the best exact one, the default."""
    exact = [r for r in rows if r.get("exact")]
    report = {
        "config": {
            **config,
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
