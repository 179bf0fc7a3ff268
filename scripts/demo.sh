#!/usr/bin/env bash
# Fresh machine -> phantom CT set -> preprocess -> train tiny GLAM-nnFormer -> sliding-window inference -> Dice report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/glam3d demo "$@"
