"""The GPU-resident sync: a CUDA model's pseudo-gradient is encoded by the Triton kernels on the device,
and a member whose state lives on a GPU agrees bit for bit with one whose state lives on the CPU.

Needs CUDA and Triton; skipped elsewhere. On the lent GPU machine (no grpc there, so without conftest; the
link puts kernels/ where an install would, as swarm.kernels):
`ln -sfn $PWD/kernels swarm/kernels; PYTHONPATH=$PWD python3 -m pytest --noconftest -p no:cacheprovider
tests/test_gpu_sync.py`.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton", reason="the GPU path's kernels need triton")

from swarm.allreduce import butterfly
from swarm.allreduce.butterfly import Participant, allreduce_attempt
from swarm.compression import CodecConfig, Contribution, ErrorFeedback, kernel_for, make_codec
from swarm.diloco import DiLoCo, GlobalState, LocalGroup, OuterConfig
from swarm.transport.endpoint import Endpoint, TransportConfig


@pytest.mark.parametrize("codec", ["int8", "sparseloco"])
def test_a_cuda_model_syncs_through_the_triton_kernel(codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = kernel_for(make_codec(CodecConfig(name=codec)))
    assert kernel is not None, "swarm.kernels registered no kernel for the codec"
    calls: list[torch.device] = []
    encode = kernel.encode

    def counting(x: torch.Tensor, feedback: ErrorFeedback | None) -> torch.Tensor:
        calls.append(x.device)
        return encode(x, feedback)

    monkeypatch.setattr(kernel, "encode", counting)
    group, hooks = LocalGroup(2), []
    models = []
    for _ in range(2):  # built here, one after the other: threads would share (and race on) the global RNG
        torch.manual_seed(0)
        models.append(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).cuda())

    def member(i: int) -> None:
        model = models[i]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator(device="cuda").manual_seed(i)
        with DiLoCo(model, opt, peer=group.member(i), sync_every=4, codec=codec) as dl:
            assert dl.device.type == "cuda" and dl.state.theta.device.type == "cuda"
            for _ in range(12):
                model(torch.randn(8, 64, device="cuda", generator=gen)).square().mean().backward()
                opt.step()
                opt.zero_grad()
        hooks.append(dl)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(hooks) == 2 and group.rounds == 3
    assert len(calls) >= 2 * 3 and all(d.type == "cuda" for d in calls), calls  # + the int8 result codec
    assert hooks[0].state.digest == hooks[1].state.digest


def test_the_outer_step_gives_the_same_bits_on_cuda_and_on_the_cpu() -> None:
    theta = torch.randn(1 << 20)
    for outer in (OuterConfig(), OuterConfig(lr=1.0, momentum=0.0, feedback_decay=0.95)):
        cpu, gpu = GlobalState(theta, outer, "cpu"), GlobalState(theta, outer, "cuda")
        assert cpu.digest == gpu.digest
        for round_ in range(3):
            mean = torch.randn(theta.numel()) * 1e-3
            assert cpu.propose(mean, round_) == gpu.propose(mean.cuda(), round_)
            cpu.adopt(round_)
            gpu.adopt(round_)
        assert torch.equal(cpu.theta, gpu.theta.cpu()) and torch.equal(cpu.momentum, gpu.momentum.cpu())
        restored = GlobalState(torch.zeros_like(theta), outer, "cuda")
        assert restored.restore(cpu.snapshot()) == cpu.digest


@pytest.mark.parametrize("pieces", [False, True], ids=["whole-parts", "in-pieces"])
@pytest.mark.parametrize("name", ["none", "int8", "sparseloco"])
def test_a_cpu_member_and_a_cuda_member_end_with_the_same_bytes(name: str, pieces: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if pieces:  # these small parts are reduced and sent back in pieces, as large ones are at the defaults
        monkeypatch.setattr(butterfly, "MIN_PIECE_BYTES", 4096)
        monkeypatch.setattr(butterfly, "MIN_FRAME_BYTES", 1024)
    else:
        monkeypatch.setattr(butterfly, "PIECES", 1)
    asyncio.run(_cpu_and_cuda_members(name))  # its own loop: the GPU machine's pytest has no asyncio plugin


async def _cpu_and_cuda_members(name: str) -> None:
    codec = make_codec(CodecConfig(name=name))
    eps = [Endpoint(f"p{i}", "r", TransportConfig()) for i in range(3)]
    for ep in eps:
        await ep.start()
    try:
        members = [Participant(e.peer_id, e.address) for e in eps]
        xs = [torch.from_numpy(np.random.default_rng(i).standard_normal(3 * 16384 + 5).astype(np.float32))
              for i in range(3)]
        devices = ["cpu", "cuda", "cuda"]
        outs = await asyncio.gather(*(allreduce_attempt(e, Contribution(x.to(d), codec), members, 0, 1, 30.0)
                                      for e, x, d in zip(eps, xs, devices, strict=True)))
        assert [o.device.type for o in outs] == devices
        assert all(torch.equal(outs[0], o.cpu()) for o in outs[1:])
    finally:
        for ep in eps:
            await ep.close()
