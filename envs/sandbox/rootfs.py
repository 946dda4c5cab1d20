"""The sandbox's root filesystem: a Debian tree built by mmdebstrap from the machine's own apt
sources (no image registry needed), cached once per machine, and the Docker base image made from
the same tree with `docker import`.

The tree holds what sandboxed programs and SWE tasks need (python3, pytest, git, patch) and an
empty `/work`, the mount point of each run's private work dir. It is never the host's `/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from envs.sandbox.base import WORK_DIR, SandboxError

ROOT_PACKAGES = ("python3", "python3-pytest", "git", "patch", "procps")
ROOT_FORMAT = 1  # bump when the build below changes, so old caches are not reused
DOCKER_REPOSITORY = "cwm-rl/sandbox-base"


def cache_dir() -> Path:
    """`$CWM_RL_CACHE`, else /var/cache/cwm-rl for root (sandboxes run as other uids and must reach the
    tree; root's home is closed to them), else ~/.cache/cwm-rl."""
    if os.environ.get("CWM_RL_CACHE"):
        return Path(os.environ["CWM_RL_CACHE"])
    return Path("/var/cache/cwm-rl") if os.geteuid() == 0 else Path.home() / ".cache" / "cwm-rl"


def host_suite() -> str:
    """The Debian suite this machine runs (its apt sources serve it), e.g. 'bookworm'."""
    try:
        fields = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    except OSError:
        fields = {}
    suite = fields.get("VERSION_CODENAME", "").strip('"')
    if not suite:
        raise SandboxError("cannot tell this machine's Debian suite from /etc/os-release (no VERSION_CODENAME); "
                           "the sandbox root is built with mmdebstrap from Debian's apt sources: run on Debian, or "
                           "point CWM_RL_SANDBOX_ROOT at a Debian root directory built elsewhere")
    return suite


def root_key(suite: str, packages: tuple[str, ...] = ROOT_PACKAGES) -> str:
    """Short hash naming one build (suite, packages, build format)."""
    return hashlib.sha256(f"{ROOT_FORMAT}|{suite}|{','.join(sorted(packages))}".encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across processes; the others wait and reuse it
        yield


def sandbox_root(build: bool = True, packages: tuple[str, ...] = ROOT_PACKAGES, log=None) -> Path:
    """The Debian root directory, built on first use (about a minute; root needed) and cached.

    `$CWM_RL_SANDBOX_ROOT` names a prebuilt tree instead (it must contain /work)."""
    if os.environ.get("CWM_RL_SANDBOX_ROOT"):
        root = Path(os.environ["CWM_RL_SANDBOX_ROOT"])
        if not (root / WORK_DIR.lstrip("/")).is_dir() or not (root / "usr" / "bin").is_dir():
            raise SandboxError(f"CWM_RL_SANDBOX_ROOT={root} is not a Debian root with an empty {WORK_DIR} directory; "
                               "unset it to let cwm-rl build one (cwm-rl sandbox build-root)")
        return root
    suite = host_suite()
    root = cache_dir() / "sandbox" / f"root-{suite}-{root_key(suite, packages)}"
    done = root.with_name(root.name + ".ok")
    if done.exists():
        return root
    if not build:
        raise SandboxError(f"no sandbox root at {root}: build it with `cwm-rl sandbox build-root` (needs root and mmdebstrap)")
    with _locked(root.with_name(root.name + ".lock")):
        if done.exists():
            return root
        _build(root, suite, packages, log)
        done.touch()
    return root


def _build(root: Path, suite: str, packages: tuple[str, ...], log) -> None:
    if shutil.which("mmdebstrap") is None:
        raise SandboxError("mmdebstrap is missing (it builds the sandbox root): apt-get install mmdebstrap")
    if os.geteuid() != 0:
        raise SandboxError("building the sandbox root needs root (mmdebstrap writes a Debian tree owned by root): "
                           "run `sudo cwm-rl sandbox build-root` once, or set CWM_RL_SANDBOX_ROOT to a built tree")
    tmp = root.with_name(root.name + f".building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if log:
        log(f"building the sandbox root ({suite}, {' '.join(packages)}) with mmdebstrap: about a minute, once per machine")
    cmd = ["mmdebstrap", "--variant=minbase", "--mode=root", f"--include={','.join(packages)}",
           f"--customize-hook=mkdir -p \"$1{WORK_DIR}\" && chmod 0755 \"$1{WORK_DIR}\"",
           "--customize-hook=rm -rf \"$1/var/cache/apt\"/*.bin \"$1/var/lib/apt/lists\"/*_Packages",
           suite, str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SandboxError(f"mmdebstrap failed (exit {result.returncode}); it needs the machine's apt sources to be reachable. "
                           f"Its last output:\n{result.stderr[-2000:]}")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


def docker_base_image(client=None, log=None) -> str:
    """The Docker image made from the sandbox root (`docker import`, no registry), built once; its tag."""
    import docker

    client = client or docker.from_env()
    root = sandbox_root(log=log)
    tag = f"{DOCKER_REPOSITORY}:{root.name.removeprefix('root-')}"

    def imported() -> bool:
        try:
            client.images.get(tag)
            return True
        except docker.errors.ImageNotFound:
            return False

    if imported():
        return tag
    with _locked(cache_dir() / "sandbox" / "docker-import.lock"):
        if imported():  # another process imported it while this one waited
            return tag
        if log:
            log(f"importing the sandbox root into Docker as {tag}")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        result = subprocess.run(["docker", "import", "--change", f"WORKDIR {WORK_DIR}", "-", tag], stdin=tar.stdout,
                                capture_output=True, text=True)
        tar.stdout.close()
        tar.wait()
        if result.returncode != 0 or tar.returncode != 0:
            raise SandboxError(f"docker import of {root} failed: {result.stderr.strip()[-1000:]}")
    return tag
