#!/usr/bin/env python
"""Checkpoint write and resume time (issue 20), against torch.save / torch.load of the same state in the same run.

A DiLoCo peer of the built-in model (or `--model 1b`: 1.03B parameters) takes one inner step and commits one
round (one member, in process), then, `--repeat` times:

* swarm: copy the state (`swarm.diloco.checkpoint_of`: θ_global, momentum, AdamW moments), write it
  (`swarm.checkpoint.write`: safetensors + manifest, fsync, rename), read it back with every check
  (`read`: sizes and digests), and restore it into a fresh peer (`restore`: the committed hash checked);
* torch: `torch.save` of the same tensors (the dict a user would save: θ, momentum, the optimizer's
  state_dict) with an fsync, then `torch.load` and the same loads into a fresh peer.

Prints JSON: per step the median seconds, the bytes written, MB/s, `ratio_*` = swarm / torch (below 1: swarm
is faster), and whether the restored state hashes to the committed hash.

Usage:
    .venv/bin/python scripts/bench_checkpoint.py --model 124m --repeat 3 --json
    python scripts/bench_checkpoint.py --model 1b --device cuda --repeat 2 --json   # a lent GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import swarm.checkpoint as ck
from swarm.diloco import DiLoCo, LocalGroup, checkpoint_of, restore
from swarm.task import SIZES, ModelConfig, build_model

BIG = {"1b": ModelConfig(dim=2048, n_layers=20, n_heads=16, ffn_hidden=5632, max_seq_len=256)}
"""Sizes beyond the built-in ones, for the GPU."""


def _peer(model_name: str, device: str, seed: int) -> tuple[DiLoCo, torch.optim.Optimizer]:
    model = build_model(BIG.get(model_name, model_name), seed=seed).to(device)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return DiLoCo(model, inner, peer=LocalGroup(1).member(0), sync_every=1_000_000), inner


def bench(model_name: str, device: str, repeat: int, folder: Path) -> dict[str, Any]:
    dl, inner = _peer(model_name, device, 0)
    with dl:
        batch = torch.randint(0, 256, (2, 65), device=device)
        dl.model.loss(batch).backward()  # type: ignore[operator]
        inner.step()  # AdamW's moments exist; then one committed round
        inner.zero_grad(set_to_none=True)
        dl.sync()
    committed = dl.state.digest
    times: dict[str, list[float]] = {k: [] for k in ("swarm_copy", "swarm_write", "swarm_read", "swarm_restore",
                                                     "torch_save", "torch_load", "torch_restore")}
    hashes_ok, written = [], 0
    for k in range(repeat):
        out = folder / f"swarm-{k}"
        t0 = time.perf_counter()
        tensors, meta = checkpoint_of(dl, inner)
        t1 = time.perf_counter()
        path = ck.write(out, run_id="bench", round_=dl.state.round, state_hash=committed, tensors=tensors, meta=meta)
        t2 = time.perf_counter()
        found = ck.read(path)
        t3 = time.perf_counter()
        fresh, fresh_inner = _peer(model_name, device, 1)
        t4 = time.perf_counter()
        restore(fresh, fresh_inner, found)
        t5 = time.perf_counter()
        hashes_ok.append(fresh.state.digest == committed)
        written = (path / ck.TENSORS).stat().st_size
        times["swarm_copy"].append(t1 - t0)
        times["swarm_write"].append(t2 - t1)
        times["swarm_read"].append(t3 - t2)
        times["swarm_restore"].append(t5 - t4)
        del tensors, found, fresh, fresh_inner
        shutil.rmtree(out)

        ref = folder / f"torch-{k}.pt"
        t0 = time.perf_counter()
        torch.save({"theta": dl.state.theta, "momentum": dl.state.momentum, "inner": inner.state_dict()}, ref)
        ck.fsync_path(ref)
        t1 = time.perf_counter()
        loaded = torch.load(ref, map_location="cpu", weights_only=True)
        t2 = time.perf_counter()
        fresh, fresh_inner = _peer(model_name, device, 1)
        t3 = time.perf_counter()
        fresh.state.theta.copy_(loaded["theta"])
        fresh.state.momentum.copy_(loaded["momentum"])
        fresh_inner.load_state_dict(loaded["inner"])
        t4 = time.perf_counter()
        times["torch_save"].append(t1 - t0)
        times["torch_load"].append(t2 - t1)
        times["torch_restore"].append(t4 - t3)
        del loaded, fresh, fresh_inner
        ref.unlink()
    med = {k: round(statistics.median(v), 4) for k, v in times.items()}
    swarm_write = med["swarm_copy"] + med["swarm_write"]
    swarm_resume = med["swarm_read"] + med["swarm_restore"]
    torch_resume = med["torch_load"] + med["torch_restore"]
    return {
        "model": model_name, "params": dl.numel, "device": device, "repeat": repeat, "bytes_written": written,
        "median_s": med, "swarm_write_s": round(swarm_write, 4), "swarm_resume_s": round(swarm_resume, 4),
        "torch_write_s": med["torch_save"], "torch_resume_s": round(torch_resume, 4),
        "swarm_write_mb_per_s": round(written / 1e6 / swarm_write, 1),
        "ratio_write": round(swarm_write / med["torch_save"], 3), "ratio_resume": round(swarm_resume / torch_resume, 3),
        "restored_on_committed_hash": all(hashes_ok),
        "note": "swarm's write includes copying the state out of training (the background writer's input) and the "
                "fsync; its read checks every file's digest and its restore the committed hash",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="124m", choices=[*SIZES, *BIG])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="", help="where to write (default: a temporary folder, removed after)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true", help="one JSON line (default: indented)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = bench(args.model, args.device, args.repeat, folder)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0 if result["restored_on_committed_hash"] else 1


if __name__ == "__main__":
    sys.exit(main())
