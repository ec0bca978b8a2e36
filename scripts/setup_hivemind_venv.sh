#!/usr/bin/env bash
# Make a separate venv with hivemind 1.1.12 for `scripts/bench_allreduce.py --vs-hivemind`.
#
# hivemind's pins (protobuf, grpcio) conflict with swarm's, so it cannot live in the project's .venv.
# numpy is kept below 2: hivemind 1.1.12's quantized codecs (e.g. Uniform8BitQuantization) decode with
# int(np.frombuffer(..., count=1)), a TypeError under numpy 2, so a compressed all-reduce silently drops peers.
# Usage: scripts/setup_hivemind_venv.sh [DIR] [extra pip arguments...]
#   DIR defaults to .hivemind-venv at the repo root, where bench_allreduce.py looks for
#   .hivemind-venv/bin/python. Idempotent: a venv that already imports the pinned versions is left as it
#   is; a half-made one is completed.
set -euo pipefail

DIR="${1:-$(cd "$(dirname "$0")/.." && pwd)/.hivemind-venv}"
shift || true
TORCH_VERSION=2.13.0
HIVEMIND_VERSION=1.1.12
NUMPY_SPEC="numpy<2"
PYTHON="${PYTHON:-python3}"

check() {
    "$DIR/bin/python" - "$TORCH_VERSION" "$HIVEMIND_VERSION" <<'EOF' 2>/dev/null
import sys
import hivemind
import numpy
import torch
ok = (torch.__version__.split("+")[0] == sys.argv[1] and hivemind.__version__ == sys.argv[2]
      and int(numpy.__version__.split(".")[0]) < 2)
sys.exit(0 if ok else 1)
EOF
}

if [ -x "$DIR/bin/python" ] && check; then
    echo "$DIR: hivemind $HIVEMIND_VERSION, torch $TORCH_VERSION and $NUMPY_SPEC already installed"
    exit 0
fi
if [ ! -x "$DIR/bin/python" ]; then
    "$PYTHON" -m venv "$DIR"
fi
"$DIR/bin/python" -m pip install "torch==$TORCH_VERSION" "hivemind==$HIVEMIND_VERSION" "$NUMPY_SPEC" "$@"
check || { echo "$DIR: hivemind $HIVEMIND_VERSION / torch $TORCH_VERSION / $NUMPY_SPEC do not import after the install" >&2; exit 1; }
echo "$DIR: ready; use it with: .venv/bin/python scripts/bench_allreduce.py --vs-hivemind --hivemind-python $DIR/bin/python"
