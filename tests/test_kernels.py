"""The Triton codec kernels (swarm.kernels) against the plain-PyTorch reference (swarm.compression).

Runs the kernels under the Triton interpreter (`TRITON_INTERPRET=1`, CPU tensors) unless the
variable is already set to 0, in which case they run on CUDA (`TRITON_INTERPRET=0 pytest
tests/test_kernels.py` on a GPU machine). The reference always runs on CPU. Payloads, decoded
values and residuals must match bit for bit (floats compared as int32 patterns, so -0.0 != +0.0).
"""

from __future__ import annotations

import os
import subprocess
import sys

# Must be set before the kernels are defined: @triton.jit reads it at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (optional: pip install triton)")

from swarm.compression import Codec, ErrorFeedback, Int8Codec, TopKCodec, kernel_for
from swarm.kernels import (
    int8_decode,
    int8_encode,
    int8_payload_nbytes,
    topk_decode,
    topk_encode,
    topk_payload_nbytes,
)
from swarm.kernels.codecs import int8_factory, topk_factory

INTERPRET = os.environ["TRITON_INTERPRET"] not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
FLT_MAX = torch.finfo(torch.float32).max


# ---------------------------------------------------------------------------------- reference


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ref_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(payload, decoded) from the plain-PyTorch reference, on CPU."""
    codec = Int8Codec()
    payload = codec.encode_reference(x.cpu())
    return payload, codec.decode_reference(payload, x.numel())


def ref_topk(
    x: torch.Tensor, residual: torch.Tensor | None, chunk: int, k: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(payload, decoded, new residual) from the plain-PyTorch reference, on CPU."""
    codec = TopKCodec(chunk=chunk, k=k, bits=bits)
    feedback = None if residual is None else ErrorFeedback(residual=residual.cpu().clone())
    payload = codec.encode_reference(x.cpu(), feedback)
    decoded = codec.decode_reference(payload, x.numel())
    return payload, decoded, None if feedback is None else feedback.residual


# ---------------------------------------------------------------------------------- helpers


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.int32)


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{what}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
    )
    if got.dtype == torch.float32:
        same = _bits(got) == _bits(want)
    else:
        same = got == want
    if not bool(same.all()):
        bad = (~same).nonzero().view(-1)
        i = int(bad[0])
        raise AssertionError(f"{what}: {bad.numel()} of {got.numel()} differ, first at {i}: {got[i]} vs {want[i]}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mixed(n: int, seed: int) -> torch.Tensor:
    """Normal values whose magnitude varies by block, so scales differ a lot."""
    g = _gen(seed)
    x = torch.randn(n, generator=g)
    return x * torch.exp(3 * torch.randn(_cdiv(n, 256), generator=g)).repeat_interleave(256)[:n]


# ---------------------------------------------------------------------------------- int8


def _int8_case(name: str, n: int) -> torch.Tensor:
    x = _mixed(n, n)
    if name == "zero_blocks":
        x[: min(n, 512)] = 0.0
        x[-7:] = 0.0
    elif name == "huge":
        x[:256] = torch.sign(x[:256]) * 1e30
        x[300:310] = -3e38
    elif name == "half_ties":
        # max 127 -> scale exactly 1, so x / scale lands on .5 exactly: round-half-even decides.
        x = (torch.arange(n) % 255 - 127).float() + 0.5
        x[::256] = 127.0
    elif name == "subnormal":
        x = x * 1e-42  # scales underflow to subnormals or 0
    return x


INT8_CASES = [
    *[("random", n) for n in (1, 255, 256, 257, 4096 + 100, 20_011)],
    *[(name, n) for name in ("zero_blocks", "huge", "half_ties", "subnormal") for n in (4096 + 100, 20_011)],
    ("subnormal", 255),
]


@pytest.mark.parametrize(("name", "n"), INT8_CASES)
def test_int8_matches_reference(name: str, n: int) -> None:
    x = _int8_case(name, n)
    want_payload, want_decoded = ref_int8(x)
    payload = int8_encode(x.to(DEVICE))
    assert payload.numel() == int8_payload_nbytes(n)
    assert_bitwise_equal(payload, want_payload, "payload")
    assert_bitwise_equal(int8_decode(payload, n), want_decoded, "decoded")


def test_int8_decode_accumulates() -> None:
    n = 5000
    x = _mixed(n, 1)
    payload, decoded = ref_int8(x)
    base = torch.randn(n, generator=_gen(2))
    out = base.clone().to(DEVICE)
    int8_decode(payload.to(DEVICE), n, out=out, accumulate=True)
    assert_bitwise_equal(out, base + decoded, "accumulated")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy computing on Inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_int8_rejects_non_finite(bad: float) -> None:
    x = _mixed(1000, 3)
    x[777] = bad
    with pytest.raises(ValueError, match="int8: input has NaN/Inf"):
        int8_encode(x.to(DEVICE))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy computing on Inf
def test_int8_rejects_values_whose_decode_overflows() -> None:
    x = _mixed(1000, 4)
    x[500] = FLT_MAX  # finite, but (x / 127) * 127 rounds to Inf: the reference rejects it too
    with pytest.raises(ValueError, match="int8: input has values so large"):
        int8_encode(x.to(DEVICE))
    x[500] = 3.40282e38  # just below: accepted, and exact
    want_payload, _ = ref_int8(x)
    assert_bitwise_equal(int8_encode(x.to(DEVICE)), want_payload, "payload near FLT_MAX")


def test_int8_empty_and_bad_arguments() -> None:
    empty = torch.empty(0, device=DEVICE)
    assert int8_encode(empty).numel() == 0
    assert int8_decode(torch.empty(0, dtype=torch.uint8, device=DEVICE), 0).numel() == 0
    with pytest.raises(ValueError, match="float32"):
        int8_encode(torch.zeros(10, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="expected"):
        int8_decode(torch.zeros(10, dtype=torch.uint8, device=DEVICE), 10)
    with pytest.raises(ValueError, match="accumulate"):
        int8_decode(int8_encode(torch.ones(10, device=DEVICE)), 10, accumulate=True)


# ---------------------------------------------------------------------------------- topk

# (chunk, k, bits): the sparseloco preset, its 4-member result codec, small and odd-k ones,
# k == chunk, and a chunk above MAX_KERNEL_CHUNK (4096: the reference encodes, the kernel decodes).
CONFIGS = [(4096, 64, 2), (4096, 256, 8), (256, 32, 4), (1024, 96, 8), (256, 256, 2), (16384, 64, 4)]


def _topk_case(name: str, n: int, chunk: int, seed: int, k: int = 64) -> torch.Tensor:
    x = _mixed(n, seed)
    if name == "zero_chunk":
        x[:chunk] = 0.0
    elif name == "huge":
        x[: min(n, chunk)] = torch.sign(x[: min(n, chunk)]) * 1e30
        x[-3:] = -1e30
    elif name == "ties":
        # Few distinct magnitudes: the threshold value is shared by many entries, both signs.
        g = _gen(seed)
        x = torch.randint(-3, 4, (n,), generator=g).float() * 0.25
    elif name == "wide":
        # Magnitudes over many binades: the threshold search spans a wide range of bit patterns.
        g = _gen(seed)
        x = torch.sign(torch.randn(n, generator=g)) * torch.exp(6.0 * torch.randn(n, generator=g))
    elif name == "cluster":
        # Small noise plus a tight cluster of near-equal large values that holds the threshold.
        g = _gen(seed)
        x = 1e-3 * torch.randn(n, generator=g)
        hot = torch.rand(n, generator=g) < 0.05
        x[hot] = 1.0 + 1e-6 * torch.randn(int(hot.sum()), generator=g)
    elif name == "spill":
        # Per chunk k - 4 distinct large values, then 20 entries of magnitude 1.0 (both signs) where the
        # threshold falls, over small noise: 16 of the ties lose, the lowest indices win. The candidates
        # are few, so the tie is broken on the compacted candidates, not in the whole-chunk search.
        g = _gen(seed)
        x = 1e-3 * torch.randn(n, generator=g)
        for start in range(0, n, chunk):
            width = min(chunk, n - start)
            big = max(0, min(k - 4, width - 20))
            pos = start + torch.randperm(width, generator=g)[: big + 20]
            x[pos[:big]] = 2.0 + torch.rand(big, generator=g)
            x[pos[big:]] = torch.where(torch.rand(pos.numel() - big, generator=g) < 0.5, -1.0, 1.0)
    elif name == "sparse":
        # Fewer non-zeros than k per chunk: zeros fill the selection (and decode to -scale/(L-1)).
        x = torch.zeros(n)
        x[torch.randperm(n, generator=_gen(seed))[: max(1, n // 1000)]] = 1.5
    return x


def _check_topk(x: torch.Tensor, residual: torch.Tensor | None, chunk: int, k: int, bits: int) -> None:
    """Both encode modes (residual in place, and to `residual_out`) and decode against the reference."""
    n = x.numel()
    want_payload, want_decoded, want_residual = ref_topk(x, residual, chunk, k, bits)
    r = residual.clone().to(DEVICE) if residual is not None else None
    payload = topk_encode(x.to(DEVICE), r, chunk=chunk, k=k, bits=bits)
    assert payload.numel() == topk_payload_nbytes(n, chunk=chunk, k=k, bits=bits)
    assert_bitwise_equal(payload, want_payload, "payload")
    # Decode over NaN: every value must be written (zeros outside the selection).
    out = torch.full((n,), float("nan"), device=DEVICE)
    assert_bitwise_equal(topk_decode(payload, n, chunk=chunk, k=k, bits=bits, out=out), want_decoded, "decoded")
    if r is not None:
        assert residual is not None
        assert_bitwise_equal(r, want_residual, "residual")
        r = residual.clone().to(DEVICE)
        new = torch.full((n,), float("nan"), device=DEVICE)
        payload = topk_encode(x.to(DEVICE), r, chunk=chunk, k=k, bits=bits, residual_out=new)
        assert_bitwise_equal(payload, want_payload, "payload (residual_out)")
        assert_bitwise_equal(new, want_residual, "residual_out")
        assert_bitwise_equal(r, residual, "residual beside residual_out")


@pytest.mark.parametrize(("chunk", "k", "bits"), CONFIGS)
@pytest.mark.parametrize("name", ["random", "zero_chunk", "huge", "ties", "sparse", "wide", "cluster", "spill"])
def test_topk_matches_reference(name: str, chunk: int, k: int, bits: int) -> None:
    n = 2 * chunk + 17 if chunk <= 4096 else chunk + 17  # odd: the last chunk is mostly padding
    x = _topk_case(name, n, chunk, seed=chunk + k + bits, k=k)
    if name in ("random", "huge", "wide"):
        residual = 0.1 * torch.randn(n, generator=_gen(7))
    elif name == "ties":  # on the same 0.25 grid, so acc = x + residual still has many equal magnitudes
        residual = torch.randint(-1, 2, (n,), generator=_gen(7)).float() * 0.25
    else:  # keep the zeros zero (and the cluster and the ties tight)
        residual = torch.zeros(n)
    _check_topk(x, residual, chunk, k, bits)


@pytest.mark.parametrize(("chunk", "k", "bits"), [(4096, 64, 2), (4096, 256, 8), (1024, 32, 4)])
def test_topk_normal_data_many_chunks(chunk: int, k: int, bits: int) -> None:
    # Normal data of one scale: the search on the compacted candidates decides (few of them), and
    # each program walks several chunks, reusing its scratch.
    n = 7 * chunk + 1000
    x = torch.randn(n, generator=_gen(chunk + k))
    _check_topk(x, 0.3 * torch.randn(n, generator=_gen(12)), chunk, k, bits)


@pytest.mark.parametrize("n", [1, 100, 256, 4095, 4097, 20_000])
def test_topk_odd_sizes_without_residual(n: int) -> None:
    _check_topk(_mixed(n, n), None, 4096, 64, 2)
    if n <= 4097:
        _check_topk(_mixed(n, n + 1), None, 256, 32, 8)


def test_topk_error_feedback_over_steps() -> None:
    # The state carried across steps must stay bit-identical to the reference's.
    n, chunk, k, bits = 10_000, 1024, 32, 2
    r_ref = torch.zeros(n)
    r = torch.zeros(n, device=DEVICE)
    for step in range(4):
        x = _mixed(n, 100 + step)
        want_payload, _, r_ref = ref_topk(x, r_ref, chunk, k, bits)
        payload = topk_encode(x.to(DEVICE), r, chunk=chunk, k=k, bits=bits)
        assert_bitwise_equal(payload, want_payload, f"payload step {step}")
        assert_bitwise_equal(r, r_ref, f"residual step {step}")


def test_topk_decode_accumulates() -> None:
    n, chunk, k, bits = 9000, 4096, 64, 2
    payload, decoded, _ = ref_topk(_mixed(n, 5), None, chunk, k, bits)
    base = torch.randn(n, generator=_gen(6))
    out = base.clone().to(DEVICE)
    topk_decode(payload.to(DEVICE), n, chunk=chunk, k=k, bits=bits, out=out, accumulate=True)
    assert_bitwise_equal(out, base + decoded, "accumulated")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy computing on Inf
@pytest.mark.parametrize("where", ["x_nan", "x_inf", "residual_inf", "sum_overflows"])
def test_topk_rejects_non_finite_and_leaves_residual(where: str) -> None:
    n = 3 * 1024 + 5
    x = _mixed(n, 8)
    residual = torch.randn(n, generator=_gen(9))
    if where == "x_nan":
        x[n - 2] = float("nan")  # in the last chunk: earlier chunks must not be touched either
    elif where == "x_inf":
        x[10] = float("-inf")
    elif where == "residual_inf":
        residual[2000] = float("inf")
    else:
        x[5], residual[5] = 3e38, 3e38  # both finite, their sum is not
    r = residual.clone().to(DEVICE)
    with pytest.raises(ValueError, match="topk: input has NaN/Inf"):
        topk_encode(x.to(DEVICE), r, chunk=1024, k=32, bits=2)
    assert_bitwise_equal(r, residual, "residual after rejection")
    with pytest.raises(ValueError, match="topk: input has NaN/Inf"):  # the check fused into the encode pass
        topk_encode(x.to(DEVICE), r, chunk=1024, k=32, bits=2, residual_out=torch.empty_like(r))
    assert_bitwise_equal(r, residual, "residual after rejection (residual_out)")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy computing on Inf
def test_topk_rejects_values_whose_decode_overflows() -> None:
    # With 8-bit values the decode multiplies the scale by 255: above ~FLT_MAX / 255 that is Inf.
    n = 1000
    x = _mixed(n, 10)
    x[100] = 1.4e36
    residual = torch.randn(n, generator=_gen(11))
    r = residual.clone().to(DEVICE)
    with pytest.raises(ValueError, match="topk: input has values so large"):
        topk_encode(x.to(DEVICE), r, chunk=256, k=32, bits=8)
    assert_bitwise_equal(r, residual, "residual after rejection")
    with pytest.raises(ValueError, match="topk: input has values so large"):
        topk_encode(x.to(DEVICE), r, chunk=256, k=32, bits=8, residual_out=torch.empty_like(r))
    assert_bitwise_equal(r, residual, "residual after rejection (residual_out)")
    x[100] = 1.3e36  # accepted with 8 bits
    _check_topk(x, residual, 256, 32, 8)


def test_topk_bad_parameters() -> None:
    x = torch.ones(1000, device=DEVICE)
    for chunk, k, bits in [
        (100, 32, 2),
        (512 + 256, 32, 2),
        (131072, 64, 2),
        (1024, 48, 2),
        (256, 288, 2),
        (1024, 64, 3),
    ]:
        with pytest.raises(ValueError, match="topk: "):
            topk_encode(x, chunk=chunk, k=k, bits=bits)
    with pytest.raises(ValueError, match="residual has"):
        topk_encode(x, torch.zeros(999, device=DEVICE), chunk=256, k=32, bits=2)
    r = torch.zeros(1000, device=DEVICE)
    with pytest.raises(ValueError, match="residual_out must be another tensor"):
        topk_encode(x, r, chunk=256, k=32, bits=2, residual_out=r)
    with pytest.raises(ValueError, match="residual_out needs residual"):
        topk_encode(x, chunk=256, k=32, bits=2, residual_out=r)
    with pytest.raises(ValueError, match="residual_out has"):
        topk_encode(x, r, chunk=256, k=32, bits=2, residual_out=torch.zeros(999, device=DEVICE))
    with pytest.raises(ValueError, match="expected"):
        topk_decode(torch.zeros(3, dtype=torch.uint8, device=DEVICE), 1000, chunk=256, k=32, bits=2)


def test_topk_sparseloco_size() -> None:
    # docs/codecs.md: 116 bytes per 16,384 input bytes for C=4096, k=64, b=2.
    assert topk_payload_nbytes(4096, chunk=4096, k=64, bits=2) == 116


# ---------------------------------------------------------------------------------- codec integration


def _kernel_encode(codec: Codec, x: torch.Tensor, feedback: ErrorFeedback | None) -> torch.Tensor:
    """Encode through the registered kernel: `Codec.encode` on CUDA; the adapter itself under the interpreter
    (Codec.encode sends CPU tensors to the reference)."""
    if not INTERPRET:
        assert kernel_for(codec) is not None, "swarm.kernels did not register a kernel for this codec"
        return codec.encode(x, feedback)
    factory = int8_factory if isinstance(codec, Int8Codec) else topk_factory
    kernel = factory(codec)
    assert kernel is not None
    if feedback is not None and feedback.residual is None:
        feedback.residual = torch.zeros_like(x)
    return kernel.encode(x, feedback)


def _kernel_decode(codec: Codec, payload: torch.Tensor, numel: int) -> torch.Tensor:
    if not INTERPRET:
        return codec.decode(payload, numel)
    factory = int8_factory if isinstance(codec, Int8Codec) else topk_factory
    kernel = factory(codec)
    assert kernel is not None
    return kernel.decode(payload, numel, torch.full((numel,), float("nan"), device=payload.device))


@pytest.mark.parametrize("codec", [Int8Codec(), TopKCodec.sparseloco(), TopKCodec(chunk=1024, k=64, bits=8)], ids=str)
@pytest.mark.parametrize("with_feedback", [False, True])
def test_registered_kernels_match_codec_reference(codec: Codec, with_feedback: bool) -> None:
    n = 9000
    residual_ref: torch.Tensor | None = None
    feedback = ErrorFeedback() if with_feedback else None
    for step in range(2):  # the second step starts from the residual the first one left
        x = _mixed(n, 20 + step)
        fb_ref = ErrorFeedback(residual=residual_ref) if with_feedback else None
        want_payload = codec.encode_reference(x, fb_ref)
        want_decoded = codec.decode_reference(want_payload, n)
        payload = _kernel_encode(codec, x.to(DEVICE), feedback)
        assert_bitwise_equal(payload, want_payload, f"payload step {step}")
        assert_bitwise_equal(_kernel_decode(codec, payload, n), want_decoded, f"decoded step {step}")
        if with_feedback:
            assert fb_ref is not None and feedback is not None and feedback.residual is not None
            assert_bitwise_equal(feedback.residual, fb_ref.residual, f"residual step {step}")
            residual_ref = fb_ref.residual


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy computing on Inf
@pytest.mark.parametrize("codec", [Int8Codec(), TopKCodec.sparseloco(), TopKCodec(chunk=256, k=32, bits=8)], ids=str)
@pytest.mark.parametrize("bad", ["nan", "sum_inf", "overflow"])
def test_registered_kernels_raise_the_codec_errors(codec: Codec, bad: str) -> None:
    n = 3000
    x = _mixed(n, 30)
    residual = torch.randn(n, generator=_gen(31))
    if bad == "nan":
        x[2999] = float("nan")
    elif bad == "sum_inf":
        x[7], residual[7] = 3e38, 3e38
    else:
        x[7] = FLT_MAX if isinstance(codec, Int8Codec) else 2e38  # topk: 2e38 * (L - 1) is Inf
    with pytest.raises(ValueError) as want:
        codec.encode_reference(x, ErrorFeedback(residual=residual.clone()))
    feedback = ErrorFeedback(residual=residual.clone().to(DEVICE))
    with pytest.raises(ValueError) as got:
        _kernel_encode(codec, x.to(DEVICE), feedback)
    assert str(got.value) == str(want.value)
    assert feedback.residual is not None
    assert_bitwise_equal(feedback.residual, residual, "residual after rejection")


def test_importing_the_package_needs_no_triton_and_registers_the_kernels() -> None:
    # Triton is optional: `import swarm.kernels` (which swarm.compression does on first CUDA use)
    # must not import it; it only registers the factories, which import it when first called.
    code = (
        "import sys, swarm.kernels\n"
        "from swarm.compression.base import _factories\n"
        "assert 'triton' not in sys.modules, 'swarm.kernels imported triton'\n"
        "assert {'int8', 'topk'} <= set(_factories), _factories\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_public_names_are_the_functions_whichever_module_was_imported_first() -> None:
    # The top-k kernels live in submodules (topk, topk_decoder, topk_format, topk_select) whose names
    # must not shadow the package's public functions: importing a submodule sets an attribute of
    # the package with the submodule's name.
    code = (
        "import swarm.kernels.topk, swarm.kernels.int8\n"
        "from swarm.kernels import __all__ as names\n"
        "import swarm.kernels as k\n"
        "bad = [n for n in names if not callable(getattr(k, n))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "1"})


def test_zero_level_result_codecs_take_the_reference() -> None:
    assert topk_factory(TopKCodec(chunk=4096, k=256, bits=8, zero_level=True)) is None
