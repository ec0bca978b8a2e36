"""Train a Hugging Face `transformers` model with the swarm DiLoCo hooks.

The model is built from a config (no download), the data is this Python's standard
library source as bytes (vocabulary 256), and the only change to a plain training loop
is the `with swarm.DiLoCo(...)` line.

    # several members in one process, no coordinator (what the test runs):
    python examples/hf_llama.py --members 2 --steps 40 --sync-every 10

    # as a peer of a real run, next to `swarm coordinator --port 7070 --run-id hf`:
    python examples/hf_llama.py --coordinator 127.0.0.1:7070 --run-id hf --peer-id alice --shard 0/2

Needs `pip install transformers` (the `hf` extra: `pip install -e '.[hf]'`).
"""

from __future__ import annotations

import argparse
import json
import threading

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import swarm
from swarm.task import Batches, Corpus, DataConfig, evaluate


def build(seed: int) -> LlamaForCausalLM:
    """A small LLaMA over bytes, the same weights for the same seed on every member."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(config)


class _Wrapped(torch.nn.Module):
    """Gives `evaluate` the `loss(batch)` it calls."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss


def train(model: LlamaForCausalLM, peer: object, batches: Batches, args: argparse.Namespace) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    with swarm.DiLoCo(model, opt, peer=peer, sync_every=args.sync_every, codec=args.codec):  # the one new line
        for _ in range(args.steps):
            batch = next(batches)
            loss = model(input_ids=batch, labels=batch).loss  # labels are shifted inside the model
            loss.backward()
            opt.step()
            opt.zero_grad()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=2, help="in-process members (without --coordinator)")
    p.add_argument("--coordinator", default="", help="HOST:PORT of a swarm coordinator")
    p.add_argument("--run-id", default="hf")
    p.add_argument("--peer-id", default="hf-peer")
    p.add_argument("--shard", default="0/1", help="I/N: this peer's shard of the corpus")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--sync-every", type=int, default=10)
    p.add_argument("--codec", default="none")
    args = p.parse_args()
    torch.set_num_threads(1)
    corpus = Corpus.load(DataConfig(seq_len=128, batch_size=8, max_bytes=4 << 20))
    probe = _Wrapped(build(0))
    before = evaluate(probe, corpus.eval, seq_len=128, batch_size=8, batches=4, device="cpu")
    if args.coordinator:
        index, count = (int(x) for x in args.shard.split("/"))
        model = build(0)
        peer = swarm.SwarmPeer(coordinator=args.coordinator, run_id=args.run_id, peer_id=args.peer_id)
        train(model, peer, Batches(corpus.shard(index, count), seq_len=128, batch_size=8, peer=index), args)
        models = [model]
    else:
        group = swarm.LocalGroup(args.members)
        models = [build(0) for _ in range(args.members)]
        threads = [threading.Thread(target=train, args=(
            models[i], group.member(i),
            Batches(corpus.shard(i, args.members), seq_len=128, batch_size=8, peer=i), args))
            for i in range(args.members)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    after = [evaluate(_Wrapped(m), corpus.eval, seq_len=128, batch_size=8, batches=4, device="cpu") for m in models]
    same = all(all(torch.equal(a, b) for a, b in zip(models[0].parameters(), m.parameters(), strict=True))
               for m in models[1:])
    print(json.dumps({"eval_loss_before": round(before, 4), "eval_loss_after": [round(x, 4) for x in after],
                      "members_identical": same}))


if __name__ == "__main__":
    main()
