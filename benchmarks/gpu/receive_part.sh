#!/usr/bin/env bash
# On the GPU machine, one device `run` call per part (benchmarks/gpu/README.md):
#   bash benchmarks/gpu/receive_part.sh .gpu/sm90/part-00      (carry: .gpu/sm90/part-00 and .gpu/sm90/manifest.json)
# Copies the carried part and its manifest to $LOWBIT_GPU_WORK/packs/NAME/ (default /tmp/lowbit-gpu, which outlives
# the call while the machine stays warm), checks the part's sha256 and says which parts are there so far.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${LOWBIT_GPU_PYTHON:-python3}" benchmarks/gpu/parts.py receive "$1"
