#!/usr/bin/env python3
"""Benchmark the pseudo-gradient codecs: compression ratio, error, error feedback, throughput.

Per codec, on a random normal fp32 vector of --numel elements:

- ratio_vs_fp32: 4*numel / payload bytes.
- rel_l2_error: ||decode(encode(x)) - x|| / ||x|| for one vector.
- rel_l2_error_after_ef_20_rounds: --rounds fresh vectors of the same distribution, each encoded with
  error feedback; ||sum(decoded) - sum(true)|| / ||sum(true)|| (sums in fp64). The same without error
  feedback is rel_l2_error_no_ef_20_rounds, for comparison.
- cpu.encode_gbps / cpu.decode_gbps: input fp32 bytes per second of the reference on CPU, median of
  --repeats runs (encode with error feedback when the codec uses it).
- With CUDA: the same for the reference on the GPU (cuda.reference) and, when swarm.kernels registers a
  kernel for the codec, for it (cuda.kernel), plus hbm_gbps (bytes the kernel must move per second:
  encode reads x [and the residual], writes the payload [and the residual]; decode reads the payload
  and writes fp32) and fraction_of_hbm = hbm_gbps / --hbm-gbps; kernel_vs_reference is the kernel's
  speed over the reference's on the same GPU and tensors.
- cuda_copy_gbps: a device-to-device copy of --numel fp32 values (bytes read plus written per second),
  the practical ceiling of a kernel that streams memory; copy_vs_reference (per codec) is how much
  faster than the reference such a copy of the bytes the kernel must move would be: no kernel can
  beat the reference by more.

Timings are reported, never asserted.

    python scripts/bench_codecs.py --json --numel 4194304
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from swarm.compression import Codec, CodecConfig, ErrorFeedback, TopKCodec, kernel_for, make_codec

DEFAULT_CODECS = "none,bf16,fp16,int8,sparseloco,topk:4096:256:8"


def parse_codec(spec: str) -> Codec:
    """`name` (a CodecConfig name) or `topk:CHUNK:K:BITS`."""
    if spec.startswith("topk:"):
        chunk, k, bits = (int(v) for v in spec.split(":")[1:])
        return TopKCodec(chunk=chunk, k=k, bits=bits)
    return make_codec(CodecConfig(name=spec))  # type: ignore[arg-type]


def label(codec: Codec) -> str:
    if isinstance(codec, TopKCodec) and codec.name == "topk":
        return f"topk({codec.chunk},{codec.k},{codec.bits})"
    return codec.name


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def ef_errors(codec: Codec, numel: int, rounds: int, seed: int) -> tuple[float, float]:
    """(error with EF, error without) of the summed decodes of `rounds` fresh random vectors."""
    g = torch.Generator().manual_seed(seed)
    fb = ErrorFeedback()
    true = torch.zeros(numel, dtype=torch.float64)
    with_ef = torch.zeros(numel, dtype=torch.float64)
    without = torch.zeros(numel, dtype=torch.float64)
    for _ in range(rounds):
        x = torch.randn(numel, generator=g)
        true += x
        with_ef += codec.decode(codec.encode(x, fb), numel)
        without += codec.decode(codec.encode(x), numel)
    return rel_l2(with_ef, true), rel_l2(without, true)


def time_cpu(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `fn` after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def time_cuda(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `fn` on the current stream (CUDA events) after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def throughput(
    codec: Codec, x: torch.Tensor, *, reference: bool, timer: Callable[[Callable[[], object], int], float], repeats: int
) -> dict[str, float]:
    """Encode/decode input-fp32 GB/s, and the seconds behind them."""
    n = x.numel()
    fb = ErrorFeedback() if codec.uses_error_feedback else None
    encode = codec.encode_reference if reference else codec.encode
    decode = codec.decode_reference if reference else codec.decode
    payload = encode(x, fb)
    out = torch.empty_like(x)
    enc_s = timer(lambda: encode(x, fb), repeats)
    dec_s = timer(lambda: decode(payload, n, out), repeats)
    return {
        "encode_gbps": 4 * n / enc_s / 1e9,
        "decode_gbps": 4 * n / dec_s / 1e9,
        "encode_s": enc_s,
        "decode_s": dec_s,
    }


def copy_gbps(numel: int, repeats: int) -> float:
    """Bytes read plus written per second of a device-to-device copy of `numel` fp32 values."""
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: dst.copy_(src), repeats)
    return 8 * numel / seconds / 1e9


def bench_codec(codec: Codec, args: argparse.Namespace, copy_rate: float | None) -> dict[str, Any]:
    n = args.numel
    x = torch.randn(n, generator=torch.Generator().manual_seed(args.seed))
    payload_nbytes = codec.payload_nbytes(n)
    with_ef, without = ef_errors(codec, min(n, args.ef_numel), args.rounds, args.seed + 1)
    result: dict[str, Any] = {
        "codec": label(codec),
        "uses_error_feedback": codec.uses_error_feedback,
        "payload_nbytes": payload_nbytes,
        "ratio_vs_fp32": 4 * n / payload_nbytes,
        "rel_l2_error": rel_l2(codec.decode(codec.encode(x), n), x),
        f"rel_l2_error_after_ef_{args.rounds}_rounds": with_ef,
        f"rel_l2_error_no_ef_{args.rounds}_rounds": without,
        "cpu": None if args.skip_cpu else throughput(codec, x, reference=True, timer=time_cpu, repeats=args.repeats),
    }
    if torch.cuda.is_available():
        xc = x.cuda()
        cuda: dict[str, Any] = {
            "reference": throughput(codec, xc, reference=True, timer=time_cuda, repeats=args.repeats)
        }
        if kernel_for(codec) is not None:
            kernel = throughput(codec, xc, reference=False, timer=time_cuda, repeats=args.repeats)
            ef_bytes = 8 * n if codec.uses_error_feedback else 0  # residual read and written
            enc_bytes = 4 * n + payload_nbytes + ef_bytes
            dec_bytes = payload_nbytes + 4 * n
            kernel["encode_hbm_gbps"] = enc_bytes / kernel["encode_s"] / 1e9
            kernel["decode_hbm_gbps"] = dec_bytes / kernel["decode_s"] / 1e9
            kernel["encode_fraction_of_hbm"] = kernel["encode_hbm_gbps"] / args.hbm_gbps
            kernel["decode_fraction_of_hbm"] = kernel["decode_hbm_gbps"] / args.hbm_gbps
            ref = cuda["reference"]
            kernel["encode_kernel_vs_reference"] = ref["encode_s"] / kernel["encode_s"]
            kernel["decode_kernel_vs_reference"] = ref["decode_s"] / kernel["decode_s"]
            if copy_rate is not None:  # the best ratio a kernel moving these bytes at copy speed could get
                kernel["encode_copy_vs_reference"] = ref["encode_s"] / (enc_bytes / (copy_rate * 1e9))
                kernel["decode_copy_vs_reference"] = ref["decode_s"] / (dec_bytes / (copy_rate * 1e9))
            cuda["kernel"] = kernel
        else:
            cuda["kernel"] = None
        result["cuda"] = cuda
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--numel", type=int, default=1 << 24, help="elements per vector (default 2**24)")
    parser.add_argument("--ef-numel", type=int, default=1 << 22, help="elements for the error-feedback rounds")
    parser.add_argument("--rounds", type=int, default=20, help="error-feedback rounds (default 20)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--codecs", default=DEFAULT_CODECS, help=f"comma-separated (default {DEFAULT_CODECS})")
    parser.add_argument("--hbm-gbps", type=float, default=3350.0, help="GPU memory bandwidth (H100 SXM: 3350)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-cpu", action="store_true", help="skip the CPU reference timings (slow at 1B)")
    args = parser.parse_args(argv)
    if args.numel < 1 or args.rounds < 1 or args.repeats < 1:
        parser.error("--numel, --rounds and --repeats must be positive")
    try:
        codecs = [parse_codec(s.strip()) for s in args.codecs.split(",") if s.strip()]
    except ValueError as e:
        parser.error(f"--codecs: {e}")

    report = {
        "numel": args.numel,
        "ef_numel": min(args.numel, args.ef_numel),
        "rounds": args.rounds,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "hbm_gbps": args.hbm_gbps,
    }
    copy_rate = copy_gbps(args.numel, args.repeats) if torch.cuda.is_available() else None
    report["cuda_copy_gbps"] = copy_rate
    report["codecs"] = [bench_codec(c, args, copy_rate) for c in codecs]
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    ef_key = f"rel_l2_error_after_ef_{args.rounds}_rounds"
    print(f"numel={args.numel} torch={report['torch']} threads={report['cpu_threads']} cuda={report['cuda_device']}")
    print(
        f"{'codec':<18}{'ratio':>9}{'rel_err':>10}{'ef_err':>10}{'enc GB/s':>10}{'dec GB/s':>10}{'kernel enc/dec':>18}"
    )
    for r in report["codecs"]:
        kernel = (r.get("cuda") or {}).get("kernel")
        k = f"{kernel['encode_gbps']:.0f}/{kernel['decode_gbps']:.0f}" if kernel else "-"
        cpu = f"{r['cpu']['encode_gbps']:>10.2f}{r['cpu']['decode_gbps']:>10.2f}" if r["cpu"] else f"{'-':>10}{'-':>10}"
        print(f"{r['codec']:<18}{r['ratio_vs_fp32']:>9.1f}{r['rel_l2_error']:>10.4f}{r[ef_key]:>10.4f}{cpu}{k:>18}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
