#!/usr/bin/env bash
# One peer made of all this host's GPUs (torchrun, DDP over NCCL inside the peer) training
# with a second, single-process peer through a swarm coordinator on loopback.
#   scripts/demo_multigpu.sh [MODEL] [STEPS] [H]     (defaults: small 100 20)
# Prints both peers' JSON reports; their state hashes must be identical.
set -euo pipefail
MODEL=${1:-small}; STEPS=${2:-100}; H=${3:-20}
PY=${PYTHON:-python3}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
DIR=$(mktemp -d)
trap 'kill $CPID 2>/dev/null || true; rm -rf "$DIR"' EXIT
$PY -m swarm.cli.main coordinator --port 0 --run-id demo --min-peers 2 >"$DIR/coord.out" 2>"$DIR/coord.err" &
CPID=$!
for _ in $(seq 100); do grep -q listening "$DIR/coord.out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(head -1 "$DIR/coord.out" | awk '{print $NF}')
COMMON=(peer --coordinator "$ADDR" --run-id demo --model "$MODEL" --steps "$STEPS" --inner-steps "$H")
if [ "$GPUS" -ge 1 ]; then
  $PY -m torch.distributed.run --nproc-per-node "$GPUS" -m swarm.cli.main "${COMMON[@]}" --peer-id gpus \
      --device cuda --shard 0/2 >"$DIR/gpus.out" 2>"$DIR/gpus.err" &
else
  $PY -m torch.distributed.run --nproc-per-node 2 -m swarm.cli.main "${COMMON[@]}" --peer-id gpus \
      --threads 1 --shard 0/2 >"$DIR/gpus.out" 2>"$DIR/gpus.err" &
fi
GPID=$!
$PY -m swarm.cli.main "${COMMON[@]}" --peer-id cpu --shard 1/2 >"$DIR/cpu.out" 2>"$DIR/cpu.err" || { tail -20 "$DIR/cpu.err"; exit 1; }
wait $GPID || { tail -20 "$DIR/gpus.err"; exit 1; }
grep -h peer_report "$DIR/gpus.out" "$DIR/cpu.out"
