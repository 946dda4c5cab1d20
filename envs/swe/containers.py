"""Per-episode containers for SWE tasks: a warm pool per task image, a cap on how many exist, and the
persistent bash session the `bash` tool talks to.

A container serves one episode (or one grading run) and is then removed. It gets the sandbox
settings of every cwm-rl container (`envs.sandbox.docker.container_options`: no network, no
capabilities, cgroup memory and process limits, rlimits), a read-only root, and size-capped tmpfs
at the repository's workdir and /tmp; the agent runs as uid 1000. Images cwm-rl built get the
repository copied from the image into the workdir's tmpfs when the container starts; a prebuilt
image (SWE-bench's) runs as its own user with a writable root, its repository where it is.

Labels: `cwm-rl.sandbox`, `cwm-rl.owner` (HOST:PID), `cwm-rl.run` and `cwm-rl.session` (one id per
container, which is the episode's session id). Containers whose owner died are reaped when the
next pool starts, by `cwm-rl sandbox reap`, and a pool removes its own on close and at exit.

When the Docker daemon stops or restarts (it stops every container), an episode's next command
raises `SandboxUnavailable` saying so, rather than a SandboxError its env would read as the agent's
doing. The pool outlives the outage: warm containers that died are dropped (and the image warmed
again once the daemon answers), and removals that failed meanwhile are retried, so nothing leaks
(`tests/faults/test_env_faults.py` restarts a daemon under a running env server).
"""

from __future__ import annotations

import atexit
import collections
import os
import queue
import re
import subprocess
import threading
import time
import uuid

from envs.sandbox.base import ENV, SANDBOX_UID, Limits, SandboxError, SandboxUnavailable
from envs.sandbox.docker import LABEL, LABEL_OWNER, LABEL_RUN, connect, owner_label, container_options, reap
from envs.sandbox.process import Finished, run_limited
from envs.swe.images import REPO_COPY, TASK_REPOSITORY

LABEL_SESSION = "cwm-rl.session"
LABEL_SWE = "cwm-rl.swe"
# Bounds of one episode's container (each a whole repository and its test runs, not one program).
SWE_LIMITS = Limits(timeout_s=60, cpu_s=900, memory_mb=2048, processes=256, file_size_mb=256, disk_mb=512,
                    open_files=1024, output_bytes=1 << 20)
USER = f"{SANDBOX_UID}:{SANDBOX_UID}"
# What the docker CLI prints when it failed rather than the command it ran (the daemon or the container is gone).
DOCKER_FAILED = re.compile(rb"Cannot connect to the Docker daemon|error during connect|Error response from daemon|No such container")


class SWEContainer:
    """One started container: `exec` runs a command in it, `shell()` opens the persistent bash."""

    def __init__(self, pool: ContainerPool, container, workdir: str, managed: bool):
        self.pool, self.container, self.workdir = pool, container, workdir
        self.id = container.id
        self.session_id = container.labels.get(LABEL_SESSION, "")
        self.user = USER if managed else None  # a prebuilt image runs as the user it names
        self.released = False
        self.spare_shell: BashSession | None = None  # started by the pool while the container waited

    def exec(self, command: list[str] | str, stdin: bytes | None = None, timeout_s: float = 60.0,
             output_bytes: int = 1 << 20) -> Finished:
        """Run a command in the repository's workdir; `timeout` inside the container kills it at the deadline."""
        argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
        user = ["-u", self.user] if self.user else []
        inside = ["timeout", "-s", "KILL", f"{max(timeout_s, 0.01):.2f}", *argv]
        done = run_limited([self.pool.docker_cli, "exec", *(["-i"] if stdin is not None else []), *user,
                            "-w", self.workdir, self.id, *inside],
                           stdin=stdin, timeout_s=timeout_s + 15, output_bytes=output_bytes)
        cli_hung = done.exit_code is None and "timeout" in done.killed_for  # `timeout` inside would have ended it sooner
        if cli_hung or (done.exit_code and DOCKER_FAILED.search(done.stderr)):
            self.raise_if_lost("docker exec")
        return done

    def lost(self, settle_s: float = 3.0) -> str | None:
        """Why this container can no longer serve its episode for a reason outside the agent's reach, or None:
        the daemon does not answer, the container was removed, or it stopped although its agent cannot stop
        it (in a cwm-rl image the agent is uid 1000 without capabilities; a prebuilt image's agent runs as
        root and may have stopped it itself: that is the episode's own doing). Asked after a failure: a
        container still running is asked about again for `settle_s` (a daemon that is shutting down
        reports its containers running a moment after their processes died)."""
        import docker

        deadline = time.monotonic() + settle_s
        while True:
            try:
                state = self.pool.client.api.inspect_container(self.id)["State"]
            except docker.errors.NotFound:
                return f"container {self.id[:12]} was removed"
            except Exception as e:
                return f"the Docker daemon does not answer ({type(e).__name__}: {e}): it stopped or is restarting"
            if not state.get("Running"):
                break
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)
        if self.user is None:
            return None
        return (f"container {self.id[:12]} stopped (exit {state.get('ExitCode')} at {state.get('FinishedAt')}), which its agent "
                "cannot do: the Docker daemon restarted, or something outside the episode stopped it")

    def raise_if_lost(self, what: str, error: BaseException | None = None) -> None:
        """Raise SandboxUnavailable when `lost()` says why the container is gone."""
        why = self.lost()
        if why is not None:
            raise SandboxUnavailable(f"{what} failed: {why}. The episode cannot go on (nothing the agent did): play it again") from error

    def usable(self) -> bool:
        """False once the bash session started for it while it waited has ended: the container stopped (a daemon
        restart stops them all)."""
        return self.spare_shell is None or self.spare_shell.alive()

    def write_file(self, path: str, data: bytes) -> Finished:
        """Write a file (making its folder) as the agent's user."""
        return self.exec(['sh', '-c', 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"', "write", path], stdin=data, timeout_s=30)

    def read_file(self, path: str, limit: int = 4 << 20) -> Finished:
        return self.exec(["cat", "--", path], timeout_s=30, output_bytes=limit)

    def shell(self, timeout_s: float = 60.0) -> BashSession:
        """The persistent bash session (the one the pool started, if it did; one `docker exec` otherwise)."""
        shell, self.spare_shell = self.spare_shell, None
        if shell is None:
            return BashSession(self, default_timeout_s=timeout_s)
        shell.default_timeout_s = timeout_s
        return shell

    def release(self) -> None:
        """Remove the container (whatever runs in it dies with it)."""
        if not self.released:
            self.released = True
            if self.spare_shell is not None:
                self.spare_shell.close()
            self.pool.remove(self.container)


class ContainerPool:
    """Containers of task images for episodes: `acquire(image)` takes a started, prepared one from
    the warm pool (or starts one when none is ready), at most `max_containers` at a time."""

    HOUSEKEEPING_S = 2.0  # how often an idle filler retries failed removals and drops dead warm containers

    def __init__(self, limits: Limits = SWE_LIMITS, pool_size: int = 2, max_containers: int = 16, pool_images: int = 4,
                 run_id: str | None = None, acquire_timeout_s: float = 600.0):
        if pool_size < 0 or max_containers < 1:
            raise ValueError(f"pool_size must be >= 0 and max_containers >= 1, got {pool_size} and {max_containers}")
        self.docker_cli, self.client = connect("(SWE envs need Docker)", timeout_s=120)
        self.limits, self.pool_size, self.pool_images = limits, pool_size, pool_images
        self.max_containers, self.acquire_timeout_s = max_containers, acquire_timeout_s
        self.run_id = run_id or os.environ.get("CWM_RL_RUN_ID", "")
        reap(self.client)  # what crashed owners left behind
        self._slots = threading.BoundedSemaphore(max_containers)
        self._ready: dict[tuple[str, str], collections.deque] = {}  # (image, workdir) -> started containers, LRU order
        self._lock = threading.Lock()
        self._mine: dict[str, object] = {}
        self._wanted: queue.Queue = queue.Queue()
        self._pending: collections.Counter = collections.Counter()  # starts queued or under way, per (image, workdir)
        self._unremoved: dict[str, object] = {}  # containers whose removal failed (the daemon was away): retried
        self._unremoved_sessions: set[str] = set()  # sessions whose failed start may have left a container: retried
        self._short: set[tuple[str, str]] = set()  # (image, workdir) short of warm containers after daemon trouble
        self._closed = threading.Event()
        self._filler = threading.Thread(target=self._fill, name="swe-container-pool", daemon=True)
        self._filler.start()
        atexit.register(self.close)

    # -- containers --------------------------------------------------------------------------
    def _start(self, image: str, workdir: str) -> SWEContainer:
        """Start and prepare one container in a slot the caller took; on failure the slot is given back."""
        managed = image.startswith(TASK_REPOSITORY + ":")
        limits = self.limits
        session = uuid.uuid4().hex[:16]
        labels = {LABEL: "1", LABEL_OWNER: owner_label(), LABEL_RUN: self.run_id, LABEL_SWE: "1", LABEL_SESSION: session}
        tmpfs = {"/tmp": f"size={limits.disk_mb}m,exec"}
        if managed:
            tmpfs[workdir] = f"size={limits.disk_mb}m,uid={SANDBOX_UID},gid={SANDBOX_UID},exec"
        # The keeper (`sleep infinity` under docker-init) runs as the container's root with no capabilities:
        # the agent runs as uid 1000 and cannot stop it.
        try:
            container = self.client.containers.run(
                image, ["sleep", "infinity"], **container_options(limits, labels, read_only=managed), tmpfs=tmpfs,
                working_dir=workdir, environment={**ENV, "HOME": "/tmp", "TZ": "UTC"})
        except Exception as e:  # the daemon refused, or timed out (or went away) after creating it: remove it by its label
            if not self._remove_session(session):
                with self._lock:
                    self._unremoved_sessions.add(session)
            self._slots.release()
            if _daemon_away(e):  # an outage, not a broken image: the episode is played again once Docker is back
                raise SandboxUnavailable(f"could not start a container of {image}: the Docker daemon does not answer "
                                         f"({type(e).__name__}: {e}); play the episode again once it is back") from e
            raise SandboxError(f"could not start a container of {image} ({type(e).__name__}: {e}); is dockerd running?") from e
        with self._lock:
            self._mine[container.id] = container  # from here on, removing it gives the slot back
        started = SWEContainer(self, container, workdir, managed)
        if managed:
            try:
                copied = started.exec(["cp", "-R", "--preserve=mode,timestamps", f"{REPO_COPY}/.", workdir + "/"], timeout_s=120)
            except BaseException:  # SandboxUnavailable: the daemon went away meanwhile
                started.release()
                raise
            if copied.exit_code != 0:
                started.release()
                raise SandboxError(f"copying the repository into a container of {image} failed: "
                                   f"{(copied.stdout + copied.stderr).decode(errors='replace')[-500:]}")
        return started

    def remove(self, container) -> None:
        """Remove a container this pool made (warm or in use) and give its slot back; idempotent. While the daemon
        does not answer, the removal is retried (by the idle filler, at the next acquire and at close)."""
        if not self._try_remove(container):
            with self._lock:
                self._unremoved[container.id] = container
        with self._lock:
            known = self._mine.pop(container.id, None)
        if known is not None:
            self._slots.release()

    @staticmethod
    def _try_remove(container) -> bool:
        import docker

        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except Exception:  # the daemon does not answer (or the removal is already under way): try again later
            return False
        return True

    def _remove_session(self, session: str) -> bool:
        """Remove the containers labelled with `session` (a start that failed half-way); False if the daemon did not answer."""
        try:
            leftovers = self.client.containers.list(all=True, filters={"label": f"{LABEL_SESSION}={session}"})
        except Exception:
            return False
        return all([self._try_remove(c) for c in leftovers])

    def _retry_removals(self) -> None:
        with self._lock:
            pending, sessions = list(self._unremoved.values()), list(self._unremoved_sessions)
        for container in pending:
            if not self._try_remove(container):
                return  # the daemon is still away: the next round tries again
            with self._lock:
                self._unremoved.pop(container.id, None)
        for session in sessions:
            if not self._remove_session(session):
                return
            with self._lock:
                self._unremoved_sessions.discard(session)

    def _housekeeping(self) -> None:
        """Recover from daemon trouble: remove what could not be removed, drop warm containers that died while they
        waited, and warm again the images left short of containers (this runs again until the daemon answers)."""
        self._retry_removals()
        with self._lock:
            dead = [(key, c) for key, ready in self._ready.items() for c in ready if not c.usable()]
            for key, container in dead:
                self._ready[key].remove(container)
                self._short.add(key)
            short, self._short = [k for k in self._short if k in self._ready], set()
        for _, container in dead:
            container.release()
        for key in short:
            if not self._closed.is_set():
                self.warm(*key)

    def _fill(self) -> None:
        while not self._closed.is_set():
            try:
                key = self._wanted.get(timeout=self.HOUSEKEEPING_S)
            except queue.Empty:
                self._housekeeping()
                continue
            if key is None:
                return
            if not self._slots.acquire(blocking=False):  # at the cap: episodes come first
                with self._lock:
                    self._pending[key] -= 1
                continue
            try:
                started = self._start(*key)
                try:  # its bash session too, so that an episode's reset waits for neither
                    started.spare_shell = BashSession(started)
                except BaseException:
                    started.release()
                    raise
            except Exception as e:  # daemon trouble: acquire starts containers itself and reports the error
                with self._lock:
                    self._pending[key] -= 1
                    if _daemon_away(e):
                        self._short.add(key)  # the housekeeping warms it again, until the daemon answers
                time.sleep(0.5)
                continue
            with self._lock:
                self._pending[key] -= 1
                ready = self._ready.get(key)
                if ready is None or self._closed.is_set():
                    ready = None
                else:
                    ready.append(started)
            if ready is None:  # the image left the pool (or the pool closed) while it started
                started.release()

    def warm(self, image: str, workdir: str = "/testbed") -> None:
        """Start `pool_size` containers of `image` in the background (acquire does this for the next episode)."""
        key = (image, workdir)
        with self._lock:
            if key not in self._ready:
                self._ready[key] = collections.deque()
                evicted = list(self._ready)[:-self.pool_images] if len(self._ready) > self.pool_images else []
                stale = [c for k in evicted for c in self._ready.pop(k)]
            else:
                self._ready[key] = self._ready.pop(key)  # most recently used last
                stale = []
            missing = max(self.pool_size - len(self._ready[key]) - self._pending[key], 0)
            self._pending[key] += missing
        for container in stale:
            container.release()
        for _ in range(missing):
            self._wanted.put(key)

    def ready(self, image: str, workdir: str = "/testbed") -> int:
        """How many started containers of `image` wait in the pool."""
        with self._lock:
            return len(self._ready.get((image, workdir), ()))

    def acquire(self, image: str, workdir: str = "/testbed") -> SWEContainer:
        """A started container of `image` with the repository in `workdir`, for one episode; `release()` it."""
        if self._closed.is_set():
            raise SandboxError("the SWE container pool is closed")
        if self._unremoved or self._unremoved_sessions:
            self._retry_removals()
        key = (image, workdir)
        deadline = time.monotonic() + self.acquire_timeout_s
        while True:
            with self._lock:
                ready = self._ready.get(key)
                started = ready.popleft() if ready else None
            if started is not None:
                if not started.usable():  # it died while it waited (the daemon restarted): the next one
                    started.release()
                    continue
                if self.pool_size:
                    self.warm(image, workdir)  # refill behind this episode
                return started
            if self._slots.acquire(timeout=0.2):
                break
            with self._lock:  # at the cap: warm containers of other images give up their slots
                spare = next((r.popleft() for k, r in self._ready.items() if k != key and r), None)
            if spare is not None:
                spare.release()
            elif time.monotonic() >= deadline:
                raise SandboxError(f"no container slot within {self.acquire_timeout_s:g} s: {self.max_containers} SWE "
                                   "containers are in use (raise max_containers, or run fewer episodes at once)")
        if self.pool_size:
            self.warm(image, workdir)
        started = self._start(image, workdir)
        if self._closed.is_set():  # closed while it started
            started.release()
            raise SandboxError("the SWE container pool is closed")
        return started

    def acquire_cold(self, image: str, workdir: str = "/testbed") -> SWEContainer:
        """A freshly started container, never one from the warm pool: what `acquire` costs when the pool is empty
        (bench/swe.py compares the two)."""
        if not self._slots.acquire(timeout=self.acquire_timeout_s):
            raise SandboxError(f"no container slot within {self.acquire_timeout_s:g} s: {self.max_containers} SWE containers are in use")
        return self._start(image, workdir)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Remove every container this pool made (warm and in use)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wanted.put(None)
        self._filler.join(timeout=120)
        with self._lock:
            warm = [c for ready in self._ready.values() for c in ready]
            self._ready.clear()
        for container in warm:  # their spare bash sessions are closed (and waited for) with them
            container.release()
        with self._lock:
            in_use = list(self._mine.values())
        for container in in_use:
            self.remove(container)
        self._retry_removals()  # what the daemon could not remove before; if it still cannot, the reaper will
        atexit.unregister(self.close)


def _daemon_away(error: BaseException | None) -> bool:
    """Whether `error`, or what caused it, says that the Docker daemon did not answer."""
    import requests

    while error is not None:
        if isinstance(error, (SandboxUnavailable, requests.exceptions.ConnectionError)):
            return True
        error = error.__cause__
    return False


_shared: dict[tuple, ContainerPool] = {}
_shared_lock = threading.Lock()


def shared_pool(**kwargs) -> ContainerPool:
    """This process's pool for the given settings (envs are made per episode; the pool is not)."""
    key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    with _shared_lock:
        pool = _shared.get(key)
        if pool is None or pool.closed:
            pool = _shared[key] = ContainerPool(**kwargs)
        return pool


def close_shared_pools() -> None:
    with _shared_lock:
        pools = list(_shared.values())
        _shared.clear()
    for pool in pools:
        pool.close()


class BashSession:
    """A persistent bash in a container: cwd, variables and functions carry over between commands.

    Each command goes in as a quoted here-document (a fresh random delimiter) that bash's own
    `read` takes and `eval` runs, with stdin from /dev/null and stderr into stdout, followed by
    a marker line carrying a fresh nonce and the exit status, so the output ends exactly where
    the marker is. Only bash builtins carry this, so a command that changes PATH does not break
    the session. A command that runs past its timeout (or prints more than `hard_output_bytes`)
    is killed with everything else the agent runs, except the shell; when the shell itself is
    what loops, or it exits (`exit`, the OOM killer), it is killed and a new one starts in the
    workdir. Output past `hard_output_bytes` is dropped as it arrives (the last 4 KiB are kept).
    """

    TAIL = 4096
    KILL_GRACE_S = 3.0

    def __init__(self, container: SWEContainer, default_timeout_s: float = 60.0, hard_output_bytes: int = 4 << 20):
        self.container, self.default_timeout_s, self.hard_output_bytes = container, default_timeout_s, hard_output_bytes
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self._changed = threading.Condition()
        self._start()

    def _start(self) -> None:
        user = ["-u", self.container.user] if self.container.user else []
        proc = subprocess.Popen([self.container.pool.docker_cli, "exec", "-i", *user, "-w", self.container.workdir,
                                 self.container.id, "bash", "--noprofile", "--norc"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
        with self._changed:
            self.proc, self._eof = proc, False
            self._clear()
        self._reader = threading.Thread(target=self._read, args=(proc,), name="swe-bash-reader", daemon=True)
        self._reader.start()
        output, status, notes = self._exchange("exec 2>&1; echo $$", 30, may_restart=False)
        if status != 0 or not output.strip().isdigit():
            self.close()
            raise SandboxError(f"the bash session did not start in container {self.container.id[:12]} (is it still running?): "
                               f"{output[-300:]!r} {notes}")
        self.pid = int(output.strip())

    def _clear(self) -> None:
        self._head, self._tail, self._dropped = bytearray(), bytearray(), 0

    def _read(self, proc: subprocess.Popen) -> None:
        while True:
            chunk = proc.stdout.read(65536)
            with self._changed:
                if proc is not self.proc:
                    return
                if not chunk:
                    self._eof = True
                elif len(self._head) + len(chunk) <= self.hard_output_bytes:
                    self._head += chunk
                else:
                    room = max(self.hard_output_bytes - len(self._head), 0)
                    self._head += chunk[:room]
                    self._tail += chunk[room:]
                    if len(self._tail) > self.TAIL:
                        self._dropped += len(self._tail) - self.TAIL
                        del self._tail[:-self.TAIL]
                self._changed.notify_all()
            if not chunk:
                return

    def _status(self, marker: bytes) -> bytes | None:
        """The exit status after the marker once the whole marker line arrived (the stream's end is searched), else None."""
        end = self._tail if self._tail else self._head[-self.TAIL:]
        found = end.find(marker)
        if found < 0 or b"\n" not in end[found:]:
            return None
        return bytes(end[found + len(marker):].split(b"\n", 1)[0].strip())

    def _text(self, marker: bytes) -> str:
        text = bytes(self._head) + (f"\n...[{self._dropped} bytes cut]...\n".encode() if self._dropped else b"") + bytes(self._tail)
        found = text.find(marker)
        output = text[:found] if found >= 0 else text
        return (output[:-1] if output.endswith(b"\n") else output).decode(errors="replace")

    def run(self, command: str, timeout_s: float | None = None) -> tuple[str, int | None, list[str]]:
        """Run one command: (output, exit status or None when it was killed, notes such as "timeout").
        Raises SandboxError when no shell can be started any more (the container is gone), SandboxUnavailable
        when that is not the agent's doing (the Docker daemon stopped or restarted)."""
        try:
            return self._exchange(command, timeout_s or self.default_timeout_s, may_restart=True)
        except SandboxError as e:
            self.container.raise_if_lost("the bash session", e)
            raise

    def alive(self) -> bool:
        """Whether the shell still runs (its `docker exec` ends when the container stops)."""
        with self._changed:
            return self.proc is not None and not self._eof and self.proc.poll() is None

    def _exchange(self, command: str, timeout_s: float, may_restart: bool) -> tuple[str, int | None, list[str]]:
        nonce = uuid.uuid4().hex
        marker = f"__cwm_rl_done_{nonce}__".encode()
        script = (f"IFS= builtin read -r -d '' __cwm_rl_command <<'__cwm_rl_{nonce}'\n{command}\n__cwm_rl_{nonce}\n"
                  f'builtin eval "$__cwm_rl_command" </dev/null\nbuiltin printf "\\n%s %s\\n" {marker.decode()} "$?"\n')
        notes: list[str] = []
        with self._changed:
            self._clear()
        try:
            self.proc.stdin.write(script.encode())
        except (BrokenPipeError, OSError):
            if not may_restart:
                return "", None, ["the shell is gone"]
            self._restart(notes, "the shell had exited")
            return "", None, notes
        deadline, killed = time.monotonic() + timeout_s, False
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._status(marker) is not None or self._eof or time.monotonic() >= deadline
                                       or (not killed and len(self._tail) > 0), timeout=max(deadline - time.monotonic(), 0))
                status, eof, over = self._status(marker), self._eof, len(self._tail) > 0
                text = self._text(marker) if status is not None or eof or time.monotonic() >= deadline else ""
            if status is not None:
                return text, (None if killed else int(status or b"0")), notes
            if not may_restart and (eof or time.monotonic() >= deadline):
                return text, None, ["the shell did not answer"]
            if eof or killed and time.monotonic() >= deadline:
                self._restart(notes, "the shell exited" if eof else "the shell itself kept running (killed)")
                return text, None, notes
            if not killed:
                notes.append("output limit: killed" if over else f"timeout: killed after {timeout_s:g} s")
                killed = True
                self._kill_others()
                deadline = time.monotonic() + self.KILL_GRACE_S

    def _kill_others(self) -> None:
        """Kill every process the agent runs but the shell and the container's keeper (the command and what it started)."""
        uid_test = f'$2 == "{SANDBOX_UID}"' if self.container.user else "1"
        script = (f"keep=\" 1 {self.pid} $$ $PPID $(ps -e -o pid=,ppid=,comm= | awk '$2 == 1 && $3 == \"sleep\" {{print $1; exit}}') \"; "
                  f"for p in $(ps -e -o pid= -o uid= | awk '{uid_test} {{print $1}}'); do "
                  f'case "$keep" in *" $p "*) ;; *) kill -9 "$p" 2>/dev/null;; esac; done; true')
        self.container.exec(["sh", "-c", script], timeout_s=15)

    def _restart(self, notes: list[str], why: str) -> None:
        old_pid = self.pid
        self.close()
        if old_pid is not None:  # a shell stuck in a builtin loop survives its docker exec client
            self.container.exec(["kill", "-9", str(old_pid)], timeout_s=15)
        notes.append(f"{why}; a new shell was started in {self.container.workdir}")
        self._start()

    def close(self) -> None:
        with self._changed:
            proc, self.proc = self.proc, None
        if proc is not None:
            for action in (proc.stdin.close, proc.kill):
                try:
                    action()
                except OSError:
                    pass
            proc.wait(timeout=10)
            self._reader.join(timeout=10)  # it reads to EOF, then the pipe can close
            proc.stdout.close()
