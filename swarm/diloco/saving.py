"""What a DiLoCo peer saves and restores: the committed global state, the error-feedback residual and the
inner optimizer's state, as named arrays for `swarm.checkpoint`.

    tensors, meta = checkpoint_of(dl, inner_opt)       # copies: training may go on meanwhile
    checkpointer.save(dl.state.round, dl.state.digest, tensors, meta)
    ...
    restore(dl, inner_opt, swarm.checkpoint.read(path))  # before `with dl:`; checks the hash

Restoring lands on the committed hash bit for bit: θ_global and the momentum are checked against the
manifest's hash (the one the coordinator committed) before anything is changed, and the model is
loaded with θ_global when the hooks are entered, as after a resync.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from swarm.checkpoint import Checkpoint, CheckpointError
from swarm.diloco.hooks import DiLoCo
from swarm.transport.endpoint import StateSnapshot

_INNER = "inner."


def _copy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.numpy().copy() if t.device.type == "cpu" else t.cpu().numpy()


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """The optimizer's per-parameter state as arrays named `inner.<index>.<key>`, and its param groups."""
    sd = opt.state_dict()
    tensors: dict[str, np.ndarray] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{_INNER}{index}.{key}"] = _copy(value) if torch.is_tensor(value) else np.asarray(value)
    groups = json.loads(json.dumps(sd["param_groups"], default=list))  # tuples (betas) as lists
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, np.ndarray], groups: list[dict[str, Any]]) -> None:
    """Load what `optimizer_tensors` saved into `opt` (built over the same parameters).

    Raises:
        CheckpointError: the saved state does not fit this optimizer's parameters.
    """
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, array in tensors.items():
        if name.startswith(_INNER):
            index, _, key = name[len(_INNER):].partition(".")
            state.setdefault(int(index), {})[key] = torch.from_numpy(array.copy())
    try:
        for g in groups:  # the schedule sets lr every step; betas back to a tuple as AdamW made them
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"the saved inner optimizer state does not fit this model: {e}") from e


def checkpoint_of(dl: DiLoCo, inner: torch.optim.Optimizer | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Copies of what `restore` needs: θ_global, momentum, residual, inner optimizer state; and the manifest's facts.

    Raises:
        ValueError: nothing was committed yet (round -1).
    """
    snap = dl.state.snapshot()
    if snap is None:
        raise ValueError("no committed state to save yet")
    tensors = {"global.theta": snap.arrays["theta"], "global.momentum": snap.arrays["momentum"]}
    if dl.feedback is not None and dl.feedback.residual is not None:
        tensors["feedback.residual"] = _copy(dl.feedback.residual)
    meta: dict[str, Any] = {"numel": dl.numel, "sync_every": dl.sync_every, "fragments": len(dl.fragments),
                            "codec": dl.codec_config.name, "outer": asdict(dl.outer)}
    if inner is not None:
        opt_tensors, groups = optimizer_tensors(inner)
        tensors.update(opt_tensors)
        meta["inner_param_groups"] = groups
    return tensors, meta


def restore(dl: DiLoCo, inner: torch.optim.Optimizer | None, ckpt: Checkpoint) -> None:
    """Make `dl` (not yet entered) and `inner` continue from `ckpt`: the committed state of its round.

    Raises:
        CheckpointError: the checkpoint is of another model, or its state does not hash to its manifest's hash
            (nothing is changed then).
    """
    if dl.state.round >= 0:
        raise CheckpointError("restore before `with dl:` (the peer already holds a committed state)")
    m, t = ckpt.manifest, ckpt.tensors
    if m.get("numel") != dl.numel or "global.theta" not in t or "global.momentum" not in t:
        raise CheckpointError(f"{ckpt.path} holds a model of {m.get('numel')} parameters, this one has {dl.numel}")
    snapshot = StateSnapshot({"round": ckpt.round, "hash": ckpt.hash, "inner_step": 0},
                             {"theta": t["global.theta"], "momentum": t["global.momentum"]})
    try:
        dl.state.restore(snapshot)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from e
    residual = t.get("feedback.residual")
    if dl.feedback is not None:
        dl.feedback.residual = None if residual is None else torch.from_numpy(residual.copy()).to(dl.device)
    if inner is not None and "inner_param_groups" in m:
        load_optimizer(inner, t, m["inner_param_groups"])
