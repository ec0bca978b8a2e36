"""Codecs against docs/codecs.md: one contract run for every codec, plus independent oracles.

The oracles here (numpy arithmetic, Python big-int bit packing) share no code with
swarm.compression, so a bug in the reference's vectorised packing cannot hide behind itself.
"""

from __future__ import annotations

import io
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm.compression import (
    BFloat16Codec,
    Codec,
    CodecConfig,
    ErrorFeedback,
    Float16Codec,
    Float32Codec,
    Int8Codec,
    TopKCodec,
    kernel_for,
    make_codec,
    register_kernel,
)
from swarm.compression import base as codec_base

SIZES = [1, 255, 256, 257, 4095, 4096, 4097, 100003]
FLT_MAX = float(np.finfo(np.float32).max)
CUDA = torch.cuda.is_available()


def _x(n: int, seed: int = 0, kind: str = "normal", max_abs: float = 1e30) -> torch.Tensor:
    """Test inputs: normal; sparse (mostly zeros); ties (few distinct magnitudes); wide (1e-35..max_abs)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(n, generator=g)
    elif kind == "sparse":
        x = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.01)
    elif kind == "ties":
        x = torch.randint(-3, 4, (n,), generator=g).float()
    elif kind == "wide":
        exponent = torch.empty(n).uniform_(-35, math.log10(max_abs), generator=g)
        x = torch.sign(torch.randn(n, generator=g)) * torch.pow(10.0, exponent.double()).float()
    else:
        raise AssertionError(kind)
    return x.clamp_(-max_abs, max_abs).contiguous()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------- independent oracles


def _pack_oracle(fields: list[int], width: int) -> bytes:
    """Field j at bits [j*w, (j+1)*w) of a little-endian stream of little-endian uint32 words."""
    stream = 0
    for j, v in enumerate(fields):
        assert 0 <= v < 1 << width
        stream |= v << (j * width)
    nbits = len(fields) * width
    assert nbits % 32 == 0
    return stream.to_bytes(nbits // 8, "little")


def _unpack_oracle(data: bytes, width: int, count: int) -> list[int]:
    stream = int.from_bytes(data, "little")
    return [(stream >> (j * width)) & ((1 << width) - 1) for j in range(count)]


def _topk_oracle(x: np.ndarray, chunk: int, k: int, bits: int) -> bytes:
    """The whole topk payload from numpy fp32 arithmetic and a stable sort."""
    n = x.size
    nc = -(-n // chunk)
    ib = chunk.bit_length() - 1
    levels = np.float32((1 << bits) - 1)
    xp = np.zeros(nc * chunk, np.float32)
    xp[:n] = x
    xp = xp.reshape(nc, chunk)
    # Stable sort of -|x|: larger |x| first, ties keep index order (-0.0 == 0.0 for the sort).
    sel = np.sort(np.argsort(-np.abs(xp), axis=1, kind="stable")[:, :k], axis=1)
    scale = np.abs(xp).max(axis=1).astype(np.float32)
    v = np.take_along_axis(xp, sel, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (v / scale[:, None] + np.float32(1)) * levels / np.float32(2)
    assert t.dtype == np.float32
    code = np.where(scale[:, None] > 0, np.clip(np.round(t), 0, levels), 0).astype(np.int64)
    return (
        scale.astype("<f4").tobytes()
        + _pack_oracle([int(i) for i in sel.reshape(-1)], ib)
        + _pack_oracle([int(c) for c in code.reshape(-1)], bits)
    )


def _parse_topk(payload: torch.Tensor, numel: int, chunk: int, k: int, bits: int):
    """(scale[nc], index[nc][k], code[nc][k]) read back with the oracle unpacker."""
    data = payload.cpu().numpy().tobytes()
    nc = -(-numel // chunk)
    ib = chunk.bit_length() - 1
    iw = nc * k * ib // 8
    scale = np.frombuffer(data[: 4 * nc], "<f4")
    idx = _unpack_oracle(data[4 * nc : 4 * nc + iw], ib, nc * k)
    code = _unpack_oracle(data[4 * nc + iw :], bits, nc * k)
    return scale, [idx[c * k : (c + 1) * k] for c in range(nc)], [code[c * k : (c + 1) * k] for c in range(nc)]


def _int8_oracle(x: np.ndarray) -> bytes:
    n = x.size
    nb = -(-n // 256)
    xp = np.zeros(nb * 256, np.float32)
    xp[:n] = x
    xp = xp.reshape(nb, 256)
    scale = (np.abs(xp).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = xp / scale[:, None]
    code = np.where(scale[:, None] > 0, np.clip(np.round(q), -127, 127), 0).astype(np.int8)
    return scale.astype("<f4").tobytes() + code.reshape(-1)[:n].tobytes()


# ---------------------------------------------------------------------------- the contract


class CodecContract:
    """What every codec promises. Subclasses set `codec` and define `check_error`."""

    codec: Codec
    max_abs: float = 1e30
    """Largest |x| the random inputs reach (within what the codec accepts)."""
    ef_factor: float = 0.2
    """Error after 20 rounds with error feedback must be below this times the error without."""

    def check_error(self, x: torch.Tensor, decoded: torch.Tensor) -> None:
        raise NotImplementedError

    @pytest.mark.parametrize("n", [0, *SIZES])
    def test_payload_size_is_announced_size(self, n: int) -> None:
        payload = self.codec.encode(_x(n, seed=n))
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() == self.codec.payload_nbytes(n)

    @pytest.mark.parametrize("n", SIZES)
    @pytest.mark.parametrize("kind", ["normal", "sparse", "ties", "wide"])
    def test_round_trip_within_bounds(self, n: int, kind: str) -> None:
        x = _x(n, seed=n, kind=kind, max_abs=self.max_abs)
        decoded = self.codec.decode(self.codec.encode(x), n)
        assert decoded.dtype == torch.float32 and decoded.shape == (n,)
        assert torch.isfinite(decoded).all()
        self.check_error(x, decoded)

    # One base-class method run by every subclass: hypothesis sees several executors, which is the point.
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.differing_executors])
    @given(
        n=st.integers(0, 3000),
        seed=st.integers(0, 2**31),
        kind=st.sampled_from(["normal", "sparse", "ties", "wide"]),
        magnitude=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
    )
    def test_round_trip_random(self, n: int, seed: int, kind: str, magnitude: float) -> None:
        x = (_x(n, seed=seed, kind=kind, max_abs=self.max_abs / 1e4) * magnitude).contiguous()
        payload = self.codec.encode(x)
        assert payload.numel() == self.codec.payload_nbytes(n)
        decoded = self.codec.decode(payload, n)
        if n:
            self.check_error(x, decoded)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    @pytest.mark.parametrize("where", [0, 300, -1])
    def test_nonfinite_rejected_and_feedback_untouched(self, bad: float, where: int) -> None:
        x = _x(1000)
        x[where] = bad
        residual = _x(1000, seed=1) * 1e-3
        before = residual.clone()
        fb = ErrorFeedback(residual=residual)
        with pytest.raises(ValueError, match=self.codec.name):
            self.codec.encode(x, fb)
        assert fb.residual is residual and torch.equal(residual, before)
        empty = ErrorFeedback()
        with pytest.raises(ValueError, match=self.codec.name):
            self.codec.encode(x, empty)
        assert empty.residual is None
        with pytest.raises(ValueError, match="NaN or Inf"):
            self.codec.encode(x)

    def test_residual_overflow_rejected(self) -> None:
        x = torch.full((10,), 3e38)
        fb = ErrorFeedback(residual=torch.full((10,), 3e38))
        with pytest.raises(ValueError, match="residual"):
            self.codec.encode(x, fb)
        assert torch.equal(fb.residual, torch.full((10,), 3e38))

    def test_empty(self) -> None:
        x = torch.empty(0)
        fb = ErrorFeedback()
        payload = self.codec.encode(x, fb)
        assert payload.numel() == 0 == self.codec.payload_nbytes(0)
        assert self.codec.decode(payload, 0).shape == (0,)

    def test_deterministic(self) -> None:
        x = _x(9000, seed=3)
        a, b = self.codec.encode(x), self.codec.encode(x.clone())
        assert torch.equal(a, b)
        fa, fb = ErrorFeedback(), ErrorFeedback()
        for _ in range(3):
            assert torch.equal(self.codec.encode(x, fa), self.codec.encode(x, fb))
        assert torch.equal(fa.residual, fb.residual)

    def test_decode_into_out_and_misaligned_payload(self) -> None:
        x = _x(5000, seed=4)
        payload = self.codec.encode(x)
        expected = self.codec.decode(payload, 5000)
        out = torch.full((5000,), 7.0)
        assert self.codec.decode(payload, 5000, out=out) is out
        assert torch.equal(out, expected)
        shifted = torch.empty(payload.numel() + 1, dtype=torch.uint8)
        shifted[1:] = payload  # a payload at an odd offset inside a larger receive buffer
        assert torch.equal(self.codec.decode(shifted[1:], 5000), expected)

    def test_payload_owns_its_bytes(self) -> None:
        x = _x(600, seed=5)
        payload = self.codec.encode(x)
        copy = payload.clone()
        x.mul_(3)
        assert torch.equal(payload, copy)

    def test_bad_arguments(self) -> None:
        x = _x(1000)
        payload = self.codec.encode(x)
        with pytest.raises(ValueError, match="bytes"):
            self.codec.decode(payload[:-1], 1000)
        with pytest.raises(ValueError, match="bytes"):
            self.codec.decode(torch.cat([payload, payload[:1]]), 1000)
        with pytest.raises(ValueError, match="uint8"):
            self.codec.decode(payload.view(torch.int8), 1000)
        with pytest.raises(ValueError, match="out"):
            self.codec.decode(payload, 1000, out=torch.empty(999))
        with pytest.raises(TypeError, match="torch.Tensor"):
            self.codec.encode([1.0, 2.0])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="float32"):
            self.codec.encode(x.double())
        with pytest.raises(ValueError, match="1-D"):
            self.codec.encode(x.view(10, 100))
        with pytest.raises(ValueError, match="contiguous"):
            self.codec.encode(x[::2])
        with pytest.raises(ValueError, match="ErrorFeedback"):
            self.codec.encode(x, ErrorFeedback(residual=torch.zeros(999)))

    def test_error_feedback_tracks_the_cumulative_sum(self) -> None:
        # The same vector 20 times: with EF the decoded sum approaches 20*x, without it stays 20*decode(x).
        x = _x(3 * 4096 + 5, seed=6)
        fb = ErrorFeedback()
        total = torch.zeros_like(x, dtype=torch.float64)  # exact for the lossless codec
        for _ in range(20):
            total += self.codec.decode(self.codec.encode(x, fb), x.numel())
        with_ef = _rel_err(total, 20 * x.double())
        without = _rel_err(self.codec.decode(self.codec.encode(x), x.numel()), x)
        if without == 0:
            assert with_ef == 0
        else:
            assert with_ef < self.ef_factor * without, (with_ef, without)

    def test_error_feedback_state_survives_save_and_load(self) -> None:
        x = _x(5000, seed=7)
        live = ErrorFeedback()
        for _ in range(2):
            self.codec.encode(x, live)
        buf = io.BytesIO()
        torch.save(live.state_dict(), buf)
        restored = ErrorFeedback()
        restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
        assert torch.equal(self.codec.encode(x, live), self.codec.encode(x, restored))
        with pytest.raises(ValueError, match="residual"):
            restored.load_state_dict({"residual": torch.zeros(3, 3)})

    def test_result_codec(self) -> None:
        with pytest.raises(ValueError, match="members"):
            self.codec.result_codec(0)
        assert not self.codec.result_codec(4).uses_error_feedback

    @pytest.mark.skipif(not CUDA, reason="needs CUDA")
    @pytest.mark.parametrize("n", SIZES)
    def test_cuda_reference_matches_cpu_bytes(self, n: int) -> None:
        x = _x(n, seed=n, kind="wide" if n % 2 else "normal", max_abs=self.max_abs)
        payload = self.codec.encode_reference(x)
        gpu = self.codec.encode_reference(x.cuda())
        assert torch.equal(gpu.cpu(), payload)
        assert torch.equal(self.codec.decode_reference(gpu, n).cpu(), self.codec.decode_reference(payload, n))

    @pytest.mark.skipif(not CUDA, reason="needs CUDA")
    @pytest.mark.parametrize("n", SIZES)
    def test_kernel_matches_reference(self, n: int) -> None:
        if kernel_for(self.codec) is None:
            pytest.skip(f"swarm.kernels registers no kernel for {self.codec!r}")
        x = _x(n, seed=n, max_abs=self.max_abs).cuda()
        ref_fb, fb = ErrorFeedback(), ErrorFeedback()
        for _ in range(2):
            ref = self.codec.encode_reference(x, ref_fb)
            assert torch.equal(self.codec.encode(x, fb), ref)
        assert torch.equal(fb.residual, ref_fb.residual)
        assert torch.equal(self.codec.decode(ref, n), self.codec.decode_reference(ref, n))


# ---------------------------------------------------------------------------- dense codecs


class TestNone(CodecContract):
    codec = Float32Codec()

    def check_error(self, x: torch.Tensor, decoded: torch.Tensor) -> None:
        assert torch.equal(decoded, x)


class TestBF16(CodecContract):
    codec = BFloat16Codec()

    def check_error(self, x: torch.Tensor, decoded: torch.Tensor) -> None:
        # Round to nearest: half an ulp of an 8-bit significand, plus half the smallest subnormal.
        assert ((decoded - x).abs() <= x.abs() * 2.0**-8 + 2.0**-134).all()


class TestFP16(CodecContract):
    codec = Float16Codec()
    max_abs = 6e4

    def check_error(self, x: torch.Tensor, decoded: torch.Tensor) -> None:
        assert ((decoded - x).abs() <= x.abs() * 2.0**-11 + 2.0**-25).all()

    def test_range(self) -> None:
        assert torch.equal(
            self.codec.decode(self.codec.encode(torch.tensor([65504.0, -65519.0])), 2),
            torch.tensor([65504.0, -65504.0]),
        )
        with pytest.raises(ValueError, match="fp16.*Inf"):
            self.codec.encode(torch.tensor([1.0, -65520.0]))


class TestInt8(CodecContract):
    codec = Int8Codec()

    def check_error(self, x: torch.Tensor, decoded: torch.Tensor) -> None:
        n = x.numel()
        nb = -(-n // 256)
        blocks = torch.nn.functional.pad(x, (0, nb * 256 - n)).view(nb, 256)
        scale = (blocks.abs().amax(dim=1) / 127).repeat_interleave(256)[:n]
        # |err| <= scale/2, with room for the fp32 division and product roundings (and subnormal scales).
        assert ((decoded - x).abs() <= scale * 0.5001 + 1e-40).all()
        assert self.codec.encode(x).numpy().tobytes() == _int8_oracle(x.numpy())

    def test_matches_numpy_oracle(self) -> None:
        for n, kind in [(1, "normal"), (257, "ties"), (4097, "wide"), (100003, "sparse")]:
            x = _x(n, seed=n, kind=kind)
            assert self.codec.encode(x).numpy().tobytes() == _int8_oracle(x.numpy())

    def test_hand_example_rounds_half_to_even(self) -> None:
        x = torch.tensor([254.0, -127.0, 1.0, 0.5, 1.5, 2.5, 3.0])
        # scale = 254/127 = 2; x/2 = 127, -63.5, 0.5, 0.25, 0.75, 1.25, 1.5 -> 127, -64, 0, 0, 1, 1, 2
        expected = struct.pack("<f", 2.0) + bytes([127, 256 - 64, 0, 0, 1, 1, 2])
        assert self.codec.encode(x).numpy().tobytes() == expected

    def test_true_division_not_reciprocal(self) -> None:
        # Values next to code boundaries where x / scale and x * (1 / scale) round to different codes:
        # the spec asks for the true division, and so must every kernel.
        amax = np.float32(3.7)
        scale = amax / np.float32(127)
        half = ((np.arange(-127, 127) + np.float32(0.5)) * scale).astype(np.float32).view(np.int32)
        cands = np.concatenate([half + d for d in range(-4, 5)]).view(np.float32)
        cands = cands[np.abs(cands) < amax]
        differ = cands[np.round(cands / scale) != np.round(cands * (np.float32(1) / scale))][:255]
        assert len(differ) > 50
        x = torch.from_numpy(np.concatenate([[amax], differ]).astype(np.float32))
        payload = self.codec.encode(x).numpy()
        assert (payload[4:].view(np.int8)[1:] == np.round(differ / scale)).all()

    def test_all_zero_block(self) -> None:
        x = torch.cat([torch.zeros(256), _x(300, seed=8)])
        payload = self.codec.encode(x)
        assert struct.unpack("<f", payload[:4].numpy().tobytes())[0] == 0.0
        assert payload[12 : 12 + 256].eq(0).all()
        decoded = self.codec.decode(payload, x.numel())
        assert decoded[:256].eq(0).all()
        self.check_error(x, decoded)

    def test_huge_magnitudes_do_not_overflow(self) -> None:
        x = torch.tensor([1e30, -1e30, 1.0, -1e30 / 3] * 100)
        decoded = self.codec.decode(self.codec.encode(x), x.numel())
        assert torch.isfinite(decoded).all()
        self.check_error(x, decoded)
        # At FLT_MAX, code 127 times the rounded-up scale FLT_MAX/127 is Inf: rejected, not sent.
        with pytest.raises(ValueError, match="int8.*Inf"):
            self.codec.encode(torch.tensor([FLT_MAX, 1.0]))


# ---------------------------------------------------------------------------- topk codecs


class TopKContract(CodecContract):
    codec: TopKCodec

    def check_error(self, x: torch.Tensor, decoded: torch.Tensor) -> None:
        c = self.codec
        n, chunk = x.numel(), c.chunk
        nc = -(-n // chunk)
        xp = np.zeros(nc * chunk, np.float32)
        xp[:n] = x.numpy()
        xp = xp.reshape(nc, chunk)
        selected = np.zeros((nc, chunk), bool)
        np.put_along_axis(selected, np.argsort(-np.abs(xp), axis=1, kind="stable")[:, : c.k], True, axis=1)
        selected = selected.reshape(-1)[:n]
        scale = np.repeat(np.abs(xp).max(axis=1), chunk)[:n]
        err = np.abs(decoded.numpy().astype(np.float64) - x.numpy())
        # Selected: within half a quantization step (step = 2*scale/(L-1)), plus the fp32 rounding of
        # (v/scale + 1) * (L-1) / 2 that can tip an exact half the other way; everything else exactly 0.
        assert (err[selected] <= scale[selected] / ((1 << c.bits) - 1) * (1 + 1e-4) + 1e-40).all()
        assert (decoded.numpy()[~selected] == 0).all()
        assert self.codec.encode(x).numpy().tobytes() == _topk_oracle(x.numpy(), chunk, c.k, c.bits)

    def test_zero_chunk_selects_first_k(self) -> None:
        c = self.codec
        x = torch.cat([torch.zeros(c.chunk), _x(c.chunk, seed=9)])
        payload = c.encode(x)
        scale, idx, code = _parse_topk(payload, x.numel(), c.chunk, c.k, c.bits)
        assert scale[0] == 0 and idx[0] == list(range(c.k)) and code[0] == [0] * c.k
        assert c.decode(payload, x.numel())[: c.chunk].eq(0).all()

    def test_constant_magnitude_selects_lowest_indices(self) -> None:
        c = self.codec
        signs = torch.tensor([1.0, -1.0]).repeat(c.chunk // 2)
        _, idx, _ = _parse_topk(c.encode(signs * 0.25), c.chunk, c.chunk, c.k, c.bits)
        assert idx[0] == list(range(c.k))
        # More than k entries tie for the largest |x|: the k lowest of them win.
        ties = torch.arange(3, c.chunk, 3)[: c.k + 5]
        if len(ties) <= c.k:
            return  # k close to C: not enough room for a tie group larger than k
        x = _x(c.chunk, seed=10).clamp(-1, 1)
        x[ties] = 5.0 * torch.tensor([1.0, -1.0]).repeat(len(ties))[: len(ties)]
        _, idx, _ = _parse_topk(c.encode(x), c.chunk, c.chunk, c.k, c.bits)
        assert idx[0] == ties[: c.k].tolist()

    def test_huge_magnitudes(self) -> None:
        c = self.codec
        levels = (1 << c.bits) - 1
        ok = torch.tensor([1e30, -1e30, 1.0] * 200)
        assert torch.isfinite(c.decode(c.encode(ok), ok.numel())).all()
        # The spec's decode ((2c-(L-1)) * scale) / (L-1) overflows above FLT_MAX/(L-1): rejected.
        with pytest.raises(ValueError, match="Inf"):
            c.encode(torch.tensor([FLT_MAX / levels * 1.01, 1.0]))


class TestSparseLoCo(TopKContract):
    codec = TopKCodec.sparseloco()
    ef_factor = 0.8  # same vector each round: 20 rounds can visit at most 20*k of each chunk's C entries

    def test_preset_and_ratio(self) -> None:
        assert self.codec == make_codec(CodecConfig(name="sparseloco"))
        assert (self.codec.chunk, self.codec.k, self.codec.bits) == (4096, 64, 2)
        assert self.codec.uses_error_feedback
        assert self.codec.payload_nbytes(4096) == 116
        ratio = 4 * (1 << 24) / self.codec.payload_nbytes(1 << 24)
        assert ratio >= 97 and ratio == pytest.approx(16384 / 116)

    def test_result_codec_carries_union_of_members(self) -> None:
        members, n = 4, 2 * 4096 + 1000
        decoded = [self.codec.decode(self.codec.encode(_x(n, seed=20 + m)), n) for m in range(members)]
        reduced = torch.zeros(n)
        for d in decoded:  # reduced in fp32 in member order, as the owner does
            reduced += d
        result = self.codec.result_codec(members)
        assert result == TopKCodec(chunk=4096, k=256, bits=8, zero_level=True)
        payload = result.encode(reduced)
        final = result.decode(payload, n)
        _, idx, _ = _parse_topk(payload, n, 4096, 256, 8)
        scale = [float(reduced[c * 4096 : (c + 1) * 4096].abs().max()) for c in range(3)]
        for c in range(3):
            lo, hi = c * 4096, min(n, (c + 1) * 4096)
            union = {int(i) - lo for d in decoded for i in torch.nonzero(d[lo:hi]).view(-1) + lo}
            assert union and len(union) <= 256
            chosen = set(idx[c])
            assert union <= chosen  # every member's contribution passes
            # The free slots go to the lowest-index zeros of the reduced chunk and, the result codec
            # having a zero level, decode to exactly 0: nothing is injected where nobody sent anything.
            fillers = sorted(chosen - union)
            zeros = [i for i in range(4096) if i not in union]
            assert fillers == zeros[: 256 - len(union)]
            in_union = torch.zeros(hi - lo, dtype=torch.bool)
            in_union[sorted(union)] = True
            filler = torch.zeros(hi - lo, dtype=torch.bool)
            filler[[i for i in fillers if lo + i < n]] = True
            err = (final[lo:hi] - reduced[lo:hi]).abs()
            assert (err[in_union] <= scale[c] / 127 / 2 * (1 + 1e-4)).all()  # half a step of 255 levels
            assert final[lo:hi][filler].eq(0).all()
            assert final[lo:hi][~in_union & ~filler].eq(0).all()


class TestTopK256(TopKContract):
    codec = TopKCodec(chunk=256, k=32, bits=2)

    def test_hand_computed_payload(self) -> None:
        # Two chunks, n = 456: chunk 0 has 40 entries of magnitude 4 or 2 (ties broken by index),
        # chunk 1 (200 real + 56 padding) has only 20 non-zeros, so its 12 free slots take the
        # lowest-index zeros, which code as round_half_even(1.5) = 2.
        n = 456
        x = [0.0] * n
        big = list(range(0, 80, 4))  # 20 entries of |x| = 4, alternating sign
        mid = list(range(81, 241, 8))  # 20 entries of |x| = 2; only the 12 lowest fit
        for j, i in enumerate(big):
            x[i] = 4.0 if j % 2 == 0 else -4.0
        for j, i in enumerate(mid):
            x[i] = 2.0 if j % 2 == 0 else -2.0
        ones = list(range(256 + 10, 256 + 200, 10))[:19]  # 19 entries of |x| = 1, and one of 3
        for j, i in enumerate(ones):
            x[i] = 1.0 if j % 3 else -1.0
        x[256 + 199] = 3.0
        # Codes with L = 4, scale s: c = rne((v/s + 1) * 3 / 2).
        # chunk 0, s = 4: v=4 -> 3, v=-4 -> 0, v=2 -> rne(2.25) = 2, v=-2 -> rne(0.75) = 1
        sel0 = sorted(big + mid[:12])
        code0 = [{4.0: 3, -4.0: 0, 2.0: 2, -2.0: 1}[x[i]] for i in sel0]
        # chunk 1, s = 3: v=3 -> 3, v=1 -> rne(2) = 2, v=-1 -> rne(1) = 1, v=0 -> rne(1.5) = 2
        nonzero1 = [i - 256 for i in ones] + [199]
        zeros1 = [i for i in range(256) if i not in nonzero1][: 32 - len(nonzero1)]
        sel1 = sorted(nonzero1 + zeros1)
        code1 = [{3.0: 3, 1.0: 2, -1.0: 1, 0.0: 2}[x[256 + i]] for i in sel1]
        expected = struct.pack("<2f", 4.0, 3.0) + _pack_oracle(sel0 + sel1, 8) + _pack_oracle(code0 + code1, 2)
        payload = self.codec.encode(torch.tensor(x))
        assert payload.numpy().tobytes() == expected
        decoded = self.codec.decode(payload, n)
        levels = {0: -1.0, 1: -1 / 3, 2: 1 / 3, 3: 1.0}  # (2c - 3) / 3
        want = [0.0] * n
        for c, (sel, codes, s) in enumerate([(sel0, code0, 4.0), (sel1, code1, 3.0)]):
            for i, code in zip(sel, codes, strict=True):
                want[c * 256 + i] = float(np.float32(np.float32((2 * code - 3) * s) / np.float32(3)))
        assert decoded.tolist() == want
        assert want[256 + zeros1[0]] == pytest.approx(levels[2] * 3.0)

    def test_selected_zero_decodes_to_plus_one_level(self) -> None:
        # docs/codecs.md says a selected zero decodes to -scale/(L-1); its own formulas give
        # c = rne((0 + 1) * (L-1) / 2) = L/2 and so +scale/(L-1). The formulas are what we implement.
        x = torch.zeros(256)
        x[5] = 3.0
        decoded = self.codec.decode(self.codec.encode(x), 256)
        assert decoded[5] == 3.0 and decoded[0] == 1.0 and decoded[31] == 1.0 and decoded[32] == 0.0

    def test_packing_matches_oracle_for_every_index_width(self) -> None:
        for chunk in [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]:
            for bits in (2, 4, 8):
                c = TopKCodec(chunk=chunk, k=32, bits=bits)
                x = _x(chunk + 77, seed=chunk + bits)
                assert c.encode(x).numpy().tobytes() == _topk_oracle(x.numpy(), chunk, 32, bits), (chunk, bits)


class TestTopK2048(TopKContract):
    codec = TopKCodec(chunk=2048, k=96, bits=4, error_feedback=True)  # ib = 11: fields straddle words
    ef_factor = 0.6


class TestTopKResult(TopKContract):
    codec = TopKCodec(chunk=4096, k=256, bits=8)  # sparseloco's result codec for 4 members
    ef_factor = 0.5


class TestTopKDense(TopKContract):
    codec = TopKCodec(chunk=256, k=256, bits=8)  # k = C: every entry kept
    ef_factor = 0.2


# ---------------------------------------------------------------------------- config and hook


@pytest.mark.parametrize(
    ("name", "cls"),
    [("none", Float32Codec), ("bf16", BFloat16Codec), ("fp16", Float16Codec), ("int8", Int8Codec), ("topk", TopKCodec)],
)
def test_make_codec(name: str, cls: type) -> None:
    codec = make_codec(CodecConfig(name=name))
    assert type(codec) is cls and codec.name == name
    assert not codec.uses_error_feedback
    assert codec.result_codec(3) == codec or name == "topk"


def test_make_topk_codec_with_options() -> None:
    codec = make_codec(CodecConfig(name="topk", chunk=1024, k=96, bits=4, error_feedback=True))
    assert codec == TopKCodec(chunk=1024, k=96, bits=4, error_feedback=True)
    assert codec.uses_error_feedback
    assert codec.result_codec(20) == TopKCodec(chunk=1024, k=1024, bits=8, zero_level=True)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"name": "zstd"}, "codec.name"),
        ({"name": "int8", "k": 32}, "codec.k"),
        ({"name": "bf16", "error_feedback": True}, "codec.error_feedback"),
        ({"name": "topk", "chunk": 1000}, "codec.chunk"),
        ({"name": "topk", "chunk": 128}, "codec.chunk"),
        ({"name": "topk", "chunk": 1 << 17}, "codec.chunk"),
        ({"name": "topk", "k": 33}, "codec.k"),
        ({"name": "topk", "chunk": 256, "k": 512}, "codec.k"),
        ({"name": "topk", "k": 0}, "codec.k"),
        ({"name": "topk", "bits": 3}, "codec.bits"),
        ({"name": "topk", "error_feedback": "yes"}, "codec.error_feedback"),
        ({"name": "sparseloco", "k": 128}, "codec.k"),
        ({"name": "sparseloco", "error_feedback": False}, "codec.error_feedback"),
    ],
)
def test_config_errors_name_the_option(kwargs: dict, option: str) -> None:
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        CodecConfig(**kwargs)


def test_sparseloco_config_accepts_its_own_values() -> None:
    config = CodecConfig(name="sparseloco", chunk=4096, k=64, bits=2, error_feedback=True)
    assert make_codec(config) == TopKCodec.sparseloco()


def test_kernel_registry() -> None:
    codec = Int8Codec()
    kernel_for(codec)  # imports swarm.kernels, which may register its own factories
    saved = codec_base._factories.get("int8")
    sentinel = object()
    try:
        register_kernel("int8", lambda c: sentinel if c == codec else None)  # type: ignore[arg-type,return-value]
        assert kernel_for(codec) is sentinel
        assert kernel_for(TopKCodec()) is kernel_for(TopKCodec())  # cached per codec
    finally:
        if saved is None:
            codec_base._factories.pop("int8", None)
        else:
            codec_base._factories["int8"] = saved
        codec_base._kernel_cache.clear()


def test_zero_level_codes_decode_zero_exactly_and_round_to_nearest_step() -> None:
    codec = TopKCodec(chunk=256, k=32, bits=8, zero_level=True)
    x = torch.zeros(256)
    x[[3, 50, 200]] = torch.tensor([1.0, -0.5, 0.25])
    out = codec.decode(codec.encode(x), 256)
    # codes -H..H around H: round_half_even(v / scale * 127) -> 127, -64 (-63.5 ties to even), 32
    expected = (torch.tensor([127.0, -64.0, 32.0]) * 1.0) / torch.tensor(127.0)
    assert torch.equal(out[[3, 50, 200]], expected)
    others = torch.ones(256, dtype=torch.bool)
    others[[3, 50, 200]] = False
    assert out[others].eq(0).all(), "unused slots must decode to exactly zero"
