#!/usr/bin/env bash
# The README's main command. Sets up cwm-rl, then runs the main job.
#
# Until the training job exists (`cwm-rl train configs/quickstart.yaml`), the main job is the
# environment layer end to end: check every built-in env in-process and served over HTTP by a
# real env server on a loopback port (Gymnasium's checker, seed determinism, reference
# episodes, reward-hack probes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/cwm-rl env list
for env_id in cwm_rl/Math-v0 cwm_rl/Echo-v0; do
  .venv/bin/cwm-rl env check "$env_id" --served
done
