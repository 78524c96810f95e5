#!/usr/bin/env bash
# Install the Bergson peer (PyPI `bergson`) into a bench-only virtualenv, bench/.peer-venv
# (git-ignored). It never touches .venv: the project does not depend on Bergson; only
# bench/bench_sketch.py --bergson-python bench/.peer-venv/bin/python drives it, in a subprocess.
# Usage: bash bench/peers/install_bergson.sh   (PY=python3.11 PEER_VENV=dir to override)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PEER_VENV:-$ROOT/bench/.peer-venv}"
PY="${PY:-python3}"
BERGSON="bergson==2.5.1"
quiet() { grep -v "is ignored" || true; }  # pip's noise about this machine's extra indexes

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 10), "bergson needs Python >= 3.10"'
# Same pins as the project for everything shared (torch, transformers, peft, ...).
"$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" -r "$ROOT/bench/peers/bergson-requirements.txt" 2>&1 | quiet
# --no-deps: skips torchvision, torchaudio and bitsandbytes (see bergson-requirements.txt).
"$VENV/bin/pip" install -q --no-deps "$BERGSON" 2>&1 | quiet
"$VENV/bin/python" - <<'PY'
import sys

import bergson
import torch
from bergson.collection import collect_gradients  # noqa: F401  (the API the driver uses)

heavy = sorted(m for m in ("torchvision", "torchaudio", "bitsandbytes") if m in sys.modules)
assert not heavy, f"unexpected imports: {heavy}"
print(f"bergson {bergson.__version__}, torch {torch.__version__} in {sys.prefix}")
PY
