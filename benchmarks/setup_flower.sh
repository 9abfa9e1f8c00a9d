#!/usr/bin/env bash
# Create .venv-flower (Flower 1.42 + its Ray 2.55.1) at the repo root, apart from fedray's own venv.
# Idempotent: reruns only check that the pinned packages are installed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-flower"

[[ -x "$venv/bin/python" ]] || python3.11 -m venv "$venv"
# torch first and from the CPU wheel on find-links (+cpu sorts above a PyPI 2.13.0); flwr does not need torch.
"$venv/bin/pip" install --quiet "torch==2.13.0"
"$venv/bin/pip" install --quiet "flwr[simulation]==1.42.0" numpy
"$venv/bin/python" -c 'import torch, flwr, ray; print("torch", torch.__version__, "| flwr", flwr.__version__, "| ray", ray.__version__)'
