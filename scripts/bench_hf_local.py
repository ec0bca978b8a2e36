#!/usr/bin/env python
"""A Hugging Face model in a real run (issue 20): `swarm local --model hf:DIR` beside the built-in model of the
same shape, in the same invocation.

DIR holds a LlamaConfig of the built-in `tiny` model's shape (dim 64, 2 layers, 4 heads, SwiGLU 176, a
256-value vocabulary, untied head), config only: each peer initialises it from the run's seed. With no
tokenizer the data are bytes, so both arms train on the same windows of the same corpus and their eval
losses are comparable. Each arm is one `swarm local` run (4 peers, mutual TLS, DiLoCo) with the same flags.

Prints JSON: per arm the final eval loss (median over peers), the eval-loss curve of peer 0, tokens/s per
peer (tokens / train time) and their mean, identical final state, wall time; and `ratio_tokens_per_s` =
hf / built-in, `loss_difference` = hf − built-in.

Usage:
    .venv/bin/python scripts/bench_hf_local.py --steps 200 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _llama_folder(folder: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False).save_pretrained(folder)
    return folder


def _arm(model: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "swarm.cli.main", "local", "--peers", str(args.peers), "--model", model,
           "--steps", str(args.steps), "--inner-steps", str(args.inner_steps), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, check=False, cwd=REPO)
    summary_path = out / "summary.json"
    if not summary_path.exists():
        return {"model": model, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    summary = json.loads(summary_path.read_text())
    peers = summary["peers"]
    rates = [round(p["extra"]["tokens"] / p["extra"]["train_s"], 1) for p in peers.values()
             if (p.get("extra") or {}).get("train_s")]
    losses = [v for v in summary["final_eval_loss"].values() if v is not None]
    first = peers.get("peer-0", {}).get("extra", {}).get("evals", [])
    return {
        "model": model, "exit_code": proc.returncode, "wall_s": summary["wall_s"],
        "finished_peers": summary["finished_peers"], "state_hashes_identical": summary["state_hashes_identical"],
        "final_eval_loss_median": round(statistics.median(losses), 4) if losses else None,
        "eval_loss_curve_peer0": [(e["step"], e["eval_loss"]) for e in first],
        "tokens_per_s": rates, "tokens_per_s_mean": round(statistics.mean(rates), 1) if rates else None,
        "exported_model": summary.get("model"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--timeout-s", type=float, default=900)
    ap.add_argument("--json", action="store_true", help="one JSON line (default: indented)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        folder = _llama_folder(Path(tmp) / "tiny-llama")
        arms = {"builtin": _arm("tiny", Path(tmp) / "builtin", args),
                "hf": _arm(f"hf:{folder}", Path(tmp) / "hf", args)}
    b, h = arms["builtin"], arms["hf"]
    result: dict[str, Any] = {"peers": args.peers, "steps": args.steps, "inner_steps": args.inner_steps, **arms}
    if b.get("tokens_per_s_mean") and h.get("tokens_per_s_mean"):
        result["ratio_tokens_per_s"] = round(h["tokens_per_s_mean"] / b["tokens_per_s_mean"], 3)
    if b.get("final_eval_loss_median") is not None and h.get("final_eval_loss_median") is not None:
        result["loss_difference"] = round(h["final_eval_loss_median"] - b["final_eval_loss_median"], 4)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0 if all(a.get("state_hashes_identical") for a in arms.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
