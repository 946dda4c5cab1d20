"""The Docker backend: one fresh container per run, taken from a warm pool.

Containers run the sandbox base image (the same Debian tree as bubblewrap, `docker import`ed)
with no network, a read-only root, tmpfs /work and /tmp, an unprivileged user, no capabilities,
and cgroup limits on memory and processes plus rlimits on CPU, data size, file size and open
files. A container serves one run and is then removed, so nothing a program leaves behind
reaches the next; a background thread keeps `pool_size` started containers ready, so a run costs
one `docker exec` instead of a `docker run`.

Every container carries labels naming the process that owns it. Containers whose owner is gone
(a crash, kill -9) are reaped when the next DockerSandbox starts, by `cwm-rl sandbox reap`, and
a sandbox removes its own on close and at interpreter exit.
"""

from __future__ import annotations

import atexit
import io
import os
import queue
import shutil
import socket
import tarfile
import threading
import time

from envs.sandbox.base import ENV, SANDBOX_UID, WORK_DIR, ExecResult, Limits, Sandbox, SandboxError, as_bytes, classify, work_path
from envs.sandbox.process import run_limited

LABEL = "cwm-rl.sandbox"  # every sandbox container has it
LABEL_OWNER = "cwm-rl.owner"  # "HOSTNAME:PID" of the process that made it
LABEL_RUN = "cwm-rl.run"  # the job's run id, when it has one
# Runs the command, then kills everything else the sandbox user still runs (processes left behind
# would hold `docker exec`'s output open), and exits with the command's status.
KILL_LEFTOVERS = '"$@"; status=$?; kill -9 -1 2>/dev/null; exit $status'
STDIN_FILE = "/tmp/.cwm-rl-stdin"
# With files or stdin, one exec does it all: unpack the tar it reads (the files into the work dir,
# the program's stdin into STDIN_FILE), point stdin at that file (unlinked) or /dev/null, write a
# NUL byte to stderr (a run without it failed to set up: not the program's doing), then run.
UNPACK_THEN_RUN = (f'tar -x --no-same-owner -C / || exit 125; if [ -e {STDIN_FILE} ]; then exec <{STDIN_FILE}; rm -f {STDIN_FILE}; '
                   'else exec </dev/null; fi; printf "\\000" >&2; ' + KILL_LEFTOVERS)


def owner_label(pid: int | None = None) -> str:
    """The owner label of the containers this process (or process `pid` of this host) makes: host and pid
    (the reaper checks the pid is alive)."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def _owner_alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's: not ours to judge
    try:
        os.kill(int(pid), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def reap(client=None, everything: bool = False, run_id: str | None = None, owner: str | None = None) -> int:
    """Remove sandbox containers whose owning process is gone (all of them with `everything`, one run's with
    `run_id`, or those of `owner`, an `owner_label` whose process the caller saw die: its pid may be reused)."""
    import docker

    client = client or docker.from_env(timeout=60)
    filters = {"label": [LABEL] + ([f"{LABEL_RUN}={run_id}"] if run_id else []) + ([f"{LABEL_OWNER}={owner}"] if owner else [])}
    removed = 0
    for container in client.containers.list(all=True, filters=filters):
        if everything or run_id or owner or not _owner_alive(container.labels.get(LABEL_OWNER, "")):
            try:
                container.remove(force=True)
                removed += 1
            except docker.errors.NotFound:
                pass
    return removed


def connect(advice: str, timeout_s: float = 60.0) -> tuple[str, object]:
    """(path of the docker CLI, a pinged Docker SDK client), or a SandboxError saying what to install or start."""
    import docker

    docker_cli = shutil.which("docker")
    if docker_cli is None:
        raise SandboxError("the docker CLI is missing: apt-get install docker.io, then start dockerd")
    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
    except Exception as e:
        raise SandboxError(f"the Docker daemon is not reachable ({type(e).__name__}): start it "
                           f"(dockerd >/var/log/dockerd.log 2>&1 &) {advice}") from e
    return docker_cli, client


class DockerSandbox(Sandbox):
    backend = "docker"

    def __init__(self, image: str | None = None, limits: Limits | None = None, pool_size: int = 2,
                 run_id: str | None = None, log=None):
        self.docker_cli, self.client = connect("or use the bwrap backend")
        from envs.sandbox.rootfs import docker_base_image

        self.image = image or docker_base_image(self.client, log=log)
        self.limits = limits or Limits()
        self.labels = {LABEL: "1", LABEL_OWNER: owner_label(), LABEL_RUN: run_id or ""}
        reap(self.client)  # what crashed owners left behind
        self.pool_size = pool_size
        self._pool: queue.Queue = queue.Queue()
        self._mine: set[str] = set()  # ids of every container this sandbox made and has not removed
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._wanted = threading.Semaphore(0)
        # Starting a container takes about 0.5 s; with one filler the pool refills at 2 containers/s at most.
        self._fillers = [threading.Thread(target=self._fill, name="docker-sandbox-pool", daemon=True)
                         for _ in range(max(1, min(pool_size, 4)))]
        for _ in range(pool_size):
            self._wanted.release()
        for filler in self._fillers:
            filler.start()
        atexit.register(self.close)

    def num_warm(self) -> int:
        """Started containers waiting in the warm pool."""
        return self._pool.qsize()

    def container_ids(self) -> set[str]:
        """Ids of every container this sandbox made and has not removed (warm and running)."""
        with self._lock:
            return set(self._mine)

    # -- containers --------------------------------------------------------------------------
    def _create(self, limits: Limits):
        # The keeper (`sleep infinity` under docker-init) runs as the container's root, with no capabilities:
        # programs run as SANDBOX_UID, and their `kill -9 -1` cannot take the container down.
        disk = f"size={limits.disk_mb}m"
        container = self.client.containers.run(
            self.image, ["sleep", "infinity"], **container_options(limits, self.labels),
            tmpfs={WORK_DIR: f"{disk},uid={SANDBOX_UID},gid={SANDBOX_UID},exec", "/tmp": disk}, working_dir=WORK_DIR,
            environment=ENV)
        with self._lock:
            self._mine.add(container.id)
        return container

    def _remove(self, container) -> None:
        try:
            container.remove(force=True)
        except Exception:  # already gone (or the daemon is): the reaper gets it later
            pass
        with self._lock:
            self._mine.discard(container.id)

    def _fill(self) -> None:
        while True:
            self._wanted.acquire()
            if self._closed.is_set():
                return
            try:
                container = self._create(self.limits)
                if self._closed.is_set():  # closed while it started
                    self._remove(container)
                    return
                self._pool.put(container)
            except Exception:  # daemon trouble: runs fall back to cold containers and report the error
                time.sleep(1.0)
                self._wanted.release()

    def _acquire(self, limits: Limits):
        if limits == self.limits:
            try:
                container = self._pool.get_nowait()
                self._wanted.release()  # the filler starts a replacement now
                return container
            except queue.Empty:
                pass
        try:
            return self._create(limits)
        except Exception as e:  # the daemon refused or is gone: not the program's fault
            raise SandboxError(f"could not start a sandbox container from {self.image} ({type(e).__name__}: {e}); "
                               "is dockerd running? (`cwm-rl doctor`)") from e

    # -- runs --------------------------------------------------------------------------------
    def run(self, command: list[str] | str, files: dict[str, str | bytes] | None = None, stdin: str | bytes | None = None,
            limits: Limits | None = None) -> ExecResult:
        limits = limits or self.limits
        command = ["sh", "-c", command] if isinstance(command, str) else list(command)
        stdin_bytes = as_bytes(stdin) if stdin is not None else None
        started = time.perf_counter()
        container = self._acquire(limits)
        try:
            as_user = ["-u", f"{SANDBOX_UID}:{SANDBOX_UID}"]
            remaining = max(limits.timeout_s - (time.perf_counter() - started), 0.001)
            if files or stdin_bytes is not None:
                done = run_limited([self.docker_cli, "exec", "-i", *as_user, container.id, "sh", "-c", UNPACK_THEN_RUN,
                                    "sandbox", *command],
                                   stdin=tar_files(files or {}, stdin_bytes), timeout_s=remaining, output_bytes=limits.output_bytes)
            else:
                done = run_limited([self.docker_cli, "exec", *as_user, container.id, "sh", "-c", KILL_LEFTOVERS, "sandbox", *command],
                                   stdin=None, timeout_s=remaining, output_bytes=limits.output_bytes)
        finally:
            threading.Thread(target=self._remove, args=(container,), daemon=True).start()  # kills what is still running
        if files or stdin_bytes is not None:
            if not done.stderr.startswith(b"\0") and not done.killed_for:
                raise SandboxError(f"setting up the sandbox run failed (docker exec, then unpacking the files): "
                                   f"{done.stderr.decode(errors='replace').strip()[-500:]}")
            done.stderr = done.stderr[1:] if done.stderr.startswith(b"\0") else done.stderr
        stdout, stderr = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
        if done.exit_code in (125, 126, 127) and stderr.startswith(("Error response from daemon", "Error: No such container")):
            raise SandboxError(f"docker exec failed: {stderr.strip()[-500:]}")
        killed_for = list(done.killed_for)
        if done.exit_code == 137 and not killed_for:  # SIGKILL from inside the cgroup: the OOM killer
            killed_for.append("memory")
        return ExecResult(exit_code=done.exit_code, stdout=stdout, stderr=stderr, stdout_truncated=done.stdout_truncated,
                          stderr_truncated=done.stderr_truncated, wall_s=time.perf_counter() - started,
                          backend=self.backend, limits_hit=classify(done.exit_code, stdout, stderr, killed_for))

    def close(self) -> None:
        """Remove every container this sandbox made (pooled and in use)."""
        if self._closed.is_set():
            return
        self._closed.set()
        for filler in self._fillers:
            self._wanted.release()
        for filler in self._fillers:
            filler.join(timeout=60)  # a container it is starting now is removed before close returns
        with self._lock:
            ids = list(self._mine)
        for cid in ids:
            try:
                self.client.containers.get(cid).remove(force=True)
            except Exception:
                pass
        with self._lock:
            self._mine.clear()
        atexit.unregister(self.close)


def container_options(limits: Limits, labels: dict[str, str], read_only: bool = True) -> dict:
    """`containers.run` arguments every sandbox container gets: no network, no capabilities, no new
    privileges, docker-init as PID 1, one CPU, and cgroup memory (no swap) and process limits plus
    rlimits on CPU seconds, data size, file size and open files (the SWE env's containers too)."""
    from docker.types import Ulimit

    return dict(
        detach=True, labels=labels, network_mode="none", read_only=read_only, hostname="sandbox", cap_drop=["ALL"],
        security_opt=["no-new-privileges"], init=True, mem_limit=f"{limits.memory_mb}m", memswap_limit=f"{limits.memory_mb}m",
        pids_limit=limits.processes + 2, nano_cpus=10**9,
        ulimits=[Ulimit(name="cpu", soft=limits.cpu_s, hard=limits.cpu_s + 1),
                 Ulimit(name="data", soft=limits.memory_mb << 20, hard=limits.memory_mb << 20),
                 Ulimit(name="fsize", soft=limits.file_size_mb << 20, hard=limits.file_size_mb << 20),
                 Ulimit(name="nofile", soft=limits.open_files, hard=limits.open_files),
                 Ulimit(name="core", soft=0, hard=0)])


def tar_files(files: dict[str, str | bytes], stdin: bytes | None = None, work_dir: str = WORK_DIR) -> bytes:
    """A tar to unpack at `/`: the files under `work_dir` (relative names, owned by the sandbox user)
    and, when given, the program's stdin as STDIN_FILE."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        entries = [(str(work_path(name)) if work_dir == WORK_DIR else f"{work_dir}/{name}", as_bytes(content))
                   for name, content in files.items()]
        for path, data in entries + ([(STDIN_FILE, stdin)] if stdin is not None else []):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.uid, info.gid = len(data), 0o666, SANDBOX_UID, SANDBOX_UID
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
