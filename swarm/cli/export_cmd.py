"""`swarm export`: a run's checkpoint as the model's plain weights (a safetensors `state_dict`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from swarm.checkpoint import Checkpoint

WEIGHTS = "model.safetensors"
CONFIG = "swarm_model.json"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's checkpoint as the model's weights (safetensors state_dict)",
        description=(
            "Read a checkpoint written by `swarm peer --checkpoint-dir DIR` (a round-N folder, or DIR itself for its "
            "newest valid checkpoint; a damaged one is skipped, saying why), check it, and write the model's "
            f"parameters as a plain state_dict: TO/{WEIGHTS} (load it with safetensors.torch.load_model or "
            f"load_file + load_state_dict) and TO/{CONFIG} (model size, run, round, committed hash). The weights are "
            "θ_global of the checkpoint's round: the state every member of the run held. A run of --model hf:PATH "
            "is written in Hugging Face format instead (save_pretrained: config, weights, tokenizer; load it with "
            "from_pretrained(TO)): PATH must still hold the model's config."
        ),
        epilog="example: swarm export runs/p0-checkpoints --to exported/",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a round-N checkpoint folder, or a folder of them")
    p.add_argument("--to", required=True, metavar="DIR", help="folder to write (new, or empty)")
    p.add_argument("--run-id", default=None, help="only take a checkpoint of this run (default: any)")
    p.add_argument("--force", action="store_true", help=f"write into a folder that is not empty (replaces {WEIGHTS} "
                                                         f"and {CONFIG} there, nothing else)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import swarm.checkpoint as ck

    out = Path(args.to)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        print(f"swarm export: --to {out} exists and is not an empty folder; choose another, or --force to write "
              f"{WEIGHTS} and {CONFIG} into it", file=sys.stderr)
        return 2
    source = Path(args.checkpoint)
    try:
        found = ck.find(source, run_id=args.run_id)
        if found is None:
            raise ck.CheckpointError(f"{source} holds no valid checkpoint"
                                     + (f" of run {args.run_id!r}" if args.run_id else ""))
        info = export(found, out)
    except ck.CheckpointError as e:
        print(f"swarm export: {e}", file=sys.stderr)
        return 2
    print(f"exported round {found.round} of run {found.run_id!r} ({info['params']:,} parameters, model "
          f"{info['model']!r}) from {found.path} to {out}")
    return 0


def export(found: Checkpoint, out: Path) -> dict[str, object]:
    """Write `found`'s model weights and facts into the folder `out` (made if needed); returns the facts.

    Raises:
        CheckpointError: the checkpoint's model is not a built-in one, or θ_global does not fit it.
    """
    import torch
    from safetensors.torch import save_model

    from swarm.checkpoint import CheckpointError
    from swarm.task.hf import is_hf, save_pretrained

    m = found.manifest
    out.mkdir(parents=True, exist_ok=True)
    if is_hf(str(m.get("model"))):  # Hugging Face format: config, weights, tokenizer (from_pretrained reads it)
        theta = found.tensors.get("global.theta")
        try:
            params = save_pretrained(m["model"], torch.from_numpy(theta.copy()) if theta is not None else
                                     torch.zeros(0), out)
        except ValueError as e:
            raise CheckpointError(f"{found.path}: {e}") from e
    else:
        model = model_of(found)
        save_model(model, str(out / WEIGHTS))
        params = sum(p.numel() for p in model.parameters())
    info = {"model": m["model"], "params": params, "run_id": m["run_id"],
            "round": m["round"], "hash": m["hash"], "global_step": m.get("global_step"), "source": str(found.path)}
    (out / CONFIG).write_text(json.dumps(info, indent=1) + "\n")
    return info


def export_newest(checkpoints: Path, to: Path) -> dict[str, object]:
    """The newest valid checkpoint in the folder `checkpoints` exported to `to`; its facts.

    Raises:
        CheckpointError: none there, or it cannot be exported.
    """
    import swarm.checkpoint as ck

    found = ck.newest(checkpoints)
    if found is None:
        raise ck.CheckpointError(f"no valid checkpoint in {checkpoints}")
    return export(found, to)


def model_of(found: Checkpoint) -> torch.nn.Module:
    """The built-in model of a checkpoint's manifest, loaded with its θ_global.

    Raises:
        CheckpointError: the manifest names no built-in model, or θ_global does not fit it.
    """
    import torch

    from swarm.checkpoint import CheckpointError
    from swarm.task import SIZES, build_model, load_flat

    name = found.manifest.get("model")
    if name not in SIZES:
        raise CheckpointError(f"{found.path}: model {name!r} is not a built-in model ({', '.join(SIZES)})")
    model = build_model(name)
    theta = found.tensors.get("global.theta")
    try:
        load_flat(model, torch.from_numpy(theta.copy()) if theta is not None else torch.empty(0))
    except ValueError:
        raise CheckpointError(f"{found.path}: θ_global does not have the {name!r} model's parameter count") from None
    return model
