"""The `train` task: the built-in byte-level model trained with DiLoCo across the swarm.

A synchronous training loop in the main thread (STYLE 9), the peer's network
side in one worker thread (`SwarmPeer`), joined by `swarm.DiLoCo`: exactly
the one-line change a user makes to their own loop. The run stops when
θ_global reaches `steps` global inner steps (rounds × sync_every), so every
peer, a late joiner too, stops at the same round.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

import swarm.checkpoint as ck
from swarm.diloco import DiLoCo, checkpoint_of, restore
from swarm.peer import PeerConfig, PeerReport, StateLost, SwarmPeer, SyncResult
from swarm.peers import attacks
from swarm.task import Batches, Corpus, build_model, count_params, evaluate
from swarm.task.hf import is_hf, load_hf
from swarm.task.schedule import inner_lr
from swarm.task.tokens import TokenCorpus
from swarm.training import TrainingConfig

log = logging.getLogger("swarm.train")


@dataclass(kw_only=True, slots=True)
class TrainConfig(TrainingConfig):
    """The train task's settings: the shared training settings (`TrainingConfig`) and the task's own."""

    TABLE: ClassVar[str] = "train"
    fragments: int = 1
    """Streaming DiLoCo: sync this many fragments at staggered steps, overlapped with training (1: off)."""
    late: str = "fold"
    """When a round starts without this peer (it came late: the coordinator's quorum or barrier deadline): fold
    keeps its inner steps on top of the new θ_global, into its next round; discard drops them."""
    eval_batches: int = 8
    """Eval windows' batches scored after every sync."""
    intra_host: bool = False
    """This peer is several processes of one host started by torchrun (data-parallel inside the peer,
    NCCL on GPUs); rank 0 talks to the swarm. torchrun's environment says the rank and world size."""
    log_every: int = 10
    """Read the training loss (a device sync) every this many steps."""
    checkpoint: ck.CheckpointConfig = field(default_factory=ck.CheckpointConfig)
    """Checkpoints of the committed state (and the last one when the peer stops), and resuming from them."""

    def __post_init__(self) -> None:
        TrainingConfig.__post_init__(self)  # (no zero-argument super() in a slots dataclass)
        if self.steps < self.sync_every:
            raise ValueError(f"train.steps ({self.steps}) must be >= train.sync_every ({self.sync_every})")
        if self.fragments < 1 or self.eval_batches < 1 or self.log_every < 1:
            raise ValueError("train.fragments, train.eval_batches and train.log_every must be >= 1")
        if self.late not in ("fold", "discard"):
            raise ValueError(f"train.late must be fold or discard, got {self.late!r}")


def train(config: TrainConfig, peer_config: PeerConfig, attack: str = "") -> PeerReport:
    """Train until θ_global reaches `config.steps` global steps, or Ctrl-C/SIGTERM; returns the report.

    Raises:
        ValueError: bad settings or data (the message names the option), or a checkpoint to resume from that
            cannot be used (`CheckpointError`).
        CoordinatorCallError: the coordinator refused the join or is unreachable.
        StateLost: nobody holds the run's committed state and this peer has no checkpoint of it.
    """
    device = torch.device(config.device)
    group, rank, world, backend = None, 0, 1, ""
    if config.intra_host:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        group, rank, world, backend = dist.group.WORLD, dist.get_rank(), dist.get_world_size(), dist.get_backend()
    tokenizer = None
    if is_hf(config.model):
        if config.intra_host:
            raise ValueError("--model hf:... in a multi-process (torchrun) peer is not supported yet; run one process")
        hf_model, tokenizer = load_hf(config.model, seed=config.seed)
        model = hf_model.to(device)
    else:
        model = build_model(config.model, seed=config.seed).to(device)
    # DDP averages gradients across this host's processes every step; DiLoCo syncs across peers.
    step_model = torch.nn.parallel.DistributedDataParallel(model) if group is not None else model
    inner = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    corpus = TokenCorpus.load(config.data, tokenizer) if tokenizer is not None else Corpus.load(config.data)
    if peer_config.shard_auto and config.intra_host:
        raise ValueError("--shard auto in a multi-process (torchrun) peer is not supported; give --shard I/N")

    def make_batches(index: int, count: int) -> Batches:
        return Batches(corpus.shard(index, count), seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                       seed=config.data.seed, peer=index * 4096 + rank)  # each process of the peer its own windows

    shard = (config.shard_index, config.shard_count)
    batches = None if peer_config.shard_auto else make_batches(*shard)  # --shard auto: after the join
    H = config.sync_every
    evals: list[dict] = []
    handle = SwarmPeer(peer_config) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    tokens = 0
    started = time.perf_counter()
    last_loss = float("nan")

    def global_step() -> int:
        # A round syncs all of θ every H steps, or one fragment every H / fragments steps when streaming (a
        # fragment's round in flight counts: otherwise a peer whose last round is slow launches one more).
        return dl.steps

    def run_finished() -> bool:
        # (final_round is set without an intra-host group only: its other ranks follow rank 0's rounds.)
        last = handle.peer.final_round if handle is not None else None
        return last is not None and dl.state.round < handle.peer.run_committed and handle.peer.run_committed >= last

    def on_sync(result: SyncResult) -> None:
        if handle is None:
            return  # rank 0 of this peer evaluates and reports
        loss = evaluate(model, corpus.eval, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                        batches=config.eval_batches, device=device)
        ep = handle.peer.endpoint
        evals.append({"round": dl.state.round, "step": (dl.state.round + 1) * dl.stride, "eval_loss": round(loss, 5),
                      "outcome": result.outcome, "members": result.members, "train_loss": round(last_loss, 5),
                      "bytes_sent": ep.bytes_sent if ep else 0, "bytes_received": ep.bytes_received if ep else 0,
                      "time_s": round(time.perf_counter() - started, 3)})
        log.info("round %d %s: eval loss %.4f", dl.state.round, result.outcome, loss)

    stopped_by = "done"
    poisoned = attacks.Attacker(handle, attack, config.seed) if attack and handle is not None else handle
    dl = DiLoCo(model, inner, peer=poisoned, sync_every=H, outer=config.outer, codec=config.codec,
                fragments=config.fragments, on_sync=on_sync, late=config.late, intra_group=group, outer_device=config.outer_device)
    run_id = peer_config.client.run_id
    resumed, data_state = _resume(config, run_id, dl, inner) if rank == 0 else (None, None)
    saver = (ck.Checkpointer(config.checkpoint, run_id, on_written=handle.set_checkpoint)
             if config.checkpoint.dir and handle is not None else None)

    def save() -> None:
        if batches is None:
            return  # never joined: nothing trained, and a resumed state is on disk already
        tensors, meta = checkpoint_of(dl, inner)
        tensors["data.generator"] = batches.state_dict()["generator"].numpy().copy()
        meta.update(model=config.model, seed=config.seed, steps=config.steps, global_step=global_step(),
                    peer_id=peer_config.client.peer_id, data_step=batches.step, shard=list(shard))
        saver.save(dl.state.round, dl.state.digest, tensors, meta)

    def on_sync_and_save(result: SyncResult) -> None:
        on_sync(result)
        if saver is not None and result.outcome in ("committed", "resynced") and saver.due(dl.state.round):
            save()

    dl.on_sync = on_sync_and_save
    if handle is not None and group is None:
        handle.peer.final_round = -(-config.steps // dl.stride) - 1  # a barrier after it is never released
    try:
        with dl:
            if batches is None:
                assert handle is not None and handle.peer.shard is not None, "the coordinator gave no shard"
                shard = handle.peer.shard
                batches = make_batches(*shard)
                log.info("training on data shard %d of %d (--shard auto)", *shard)
            if data_state is not None:
                batches.load_state_dict(data_state)
            on_sync(SyncResult("start", dl.state.round))  # the loss at the start (or at joining)
            if handle is not None and (handle.peer.run_committed + 1) * dl.stride >= config.steps:
                # Joined a run that already reached its last step (and whose peers may all be gone).
                log.warning("the run already committed round %d, its last; nothing to do", handle.peer.run_committed)
                stopped_by = "run already finished"
            while stopped_by == "done" and global_step() < config.steps:
                if run_finished():
                    # The others reached the last step and left before this peer could download that state:
                    # waiting for a round nobody else will join would never end.
                    log.warning("the run committed round %d, its last, but this peer holds round %d (its resync "
                                "failed); stopping with it", handle.peer.run_committed, dl.state.round)
                    stopped_by = "run finished without this peer"
                    break
                for param_group in inner.param_groups:
                    param_group["lr"] = inner_lr(config, global_step())
                batch = next(batches).to(device, non_blocking=True)
                with autocast:
                    loss = step_model(batch[:, :-1]) if group is not None else None
                    loss = _next_byte_loss(loss, batch) if loss is not None else model.loss(batch)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                tokens += batch.shape[0] * (batch.shape[1] - 1)
                if handle is not None and global_step() % config.log_every == 0:
                    last_loss = float(loss.detach())
                    handle.set_progress(global_step() + 1, last_loss, tokens / (time.perf_counter() - started))
                inner.step()  # the DiLoCo hook syncs here every H steps
                inner.zero_grad(set_to_none=True)
    except StateLost:
        assert handle is not None  # (only rank 0 joins)
        if (handle.peer.run_committed + 1) * dl.stride < config.steps:
            handle.close("state lost")
            raise
        # Every peer of a finished run left: nothing to resume, nothing to train.
        log.warning("the run already committed round %d, its last; nothing to do", handle.peer.run_committed)
        stopped_by = "run already finished"
        handle.close(stopped_by)
    except KeyboardInterrupt:
        stopped_by = "SIGINT"
    except SystemExit:
        stopped_by = "SIGTERM"
    finally:
        if group is not None:
            torch.distributed.destroy_process_group()
        if saver is not None:
            # The committed state when the peer stops (done, Ctrl-C, SIGTERM): nothing trained is lost.
            if dl.state.round > saver.last_round:
                save()
            saver.close()
    report = (handle.report if handle else None) or PeerReport(peer_id=peer_config.client.peer_id)
    if handle is None:
        report.stopped_by = f"rank {rank} of the peer"
    if report.stopped_by in ("", "done", "KeyboardInterrupt", "SystemExit"):
        report.stopped_by = stopped_by
    report.extra = {
        "model": config.model, "params": count_params(model), "sync_every": H, "codec": config.codec.name,
        "fragments": config.fragments,
        "tokens": tokens, "train_s": round(time.perf_counter() - started, 3),
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None, "evals": evals,
        "final_round": dl.state.round, "hooks": asdict(dl.stats), "device": str(device),
        "processes": world, "intra_backend": backend,
        "resumed_from": resumed, "shard": list(shard), "checkpoints": saver.written if saver else [],
        "checkpoint_errors": saver.errors if saver else [],
    }
    return report


def _resume(config: TrainConfig, run_id: str, dl: DiLoCo,
            inner: torch.optim.Optimizer) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Load the checkpoint to resume from, if any (before joining): `--resume`, else the newest in `--checkpoint-dir`.

    Returns:
        The checkpoint's round, hash and folder (None: none, the peer starts from its initial weights and
        takes the run's state from a live member), and the data sampler's state to continue from.
    Raises:
        CheckpointError: --resume names nothing usable, or the checkpoint is of another model or run.
    """
    c = config.checkpoint
    source = c.resume or c.dir
    if not source:
        return None, None
    path = Path(source)
    if c.resume and not path.exists():
        raise ck.CheckpointError(f"--resume {source}: no such file or folder")
    found = ck.find(path, run_id=run_id)
    if found is None:
        if c.resume:
            raise ck.CheckpointError(f"--resume {source}: no valid checkpoint of run {run_id!r} there")
        log.info("no checkpoint of run %r in %s yet: starting from the run's live members or the initial weights",
                 run_id, source)
        return None, None
    if found.manifest.get("model") != config.model:
        raise ck.CheckpointError(f"{found.path} is a checkpoint of model {found.manifest.get('model')!r}, "
                                 f"this peer trains {config.model!r} (--model)")
    restore(dl, inner, found)
    data = ({"generator": torch.from_numpy(found.tensors["data.generator"].copy()),
             "step": found.manifest.get("data_step", 0)} if "data.generator" in found.tensors else None)
    log.info("resuming from %s: round %d, hash %s", found.path, found.round, found.hash[:12])
    return {"round": found.round, "hash": found.hash, "path": str(found.path)}, data


def _next_byte_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Cross entropy of `logits` (of batch[:, :-1]) against the next bytes, in fp32."""
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
