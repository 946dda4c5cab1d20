"""Run one process tree with a wall-clock deadline and capped output, and time it.

Shared by the bubblewrap backend and the bare baseline the benchmark compares it with. One
thread, no polling: a selector waits on stdout, stderr, stdin and the child's pidfd together.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child before exec: get SIGKILL when the process that started it dies, even by kill -9 (Linux)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Finished:
    exit_code: int | None  # shell convention: 128 + N for death by signal N; None when we killed it
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    killed_for: list[str] = field(default_factory=list)  # "timeout" or "output"
    wall_s: float = 0.0


def run_limited(argv: list[str], *, stdin: bytes | None, timeout_s: float, output_bytes: int,
                pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None, cwd: str | None = None) -> Finished:
    """Run `argv` in a new session; kill its process group at `timeout_s` or once a stream passes `output_bytes`."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=pass_fds, env=env, cwd=cwd,
                            start_new_session=True)
    pidfd = os.pidfd_open(proc.pid)
    selector = selectors.DefaultSelector()
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    kept = {out_fd: bytearray(), err_fd: bytearray()}
    truncated = {out_fd: False, err_fd: False}
    for fd in (out_fd, err_fd):
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    selector.register(pidfd, selectors.EVENT_READ)
    unsent = memoryview(stdin or b"")
    if stdin:
        os.set_blocking(proc.stdin.fileno(), False)
        selector.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    open_streams, exited, killed_for = 2, False, []
    deadline = started + timeout_s

    def kill() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    try:
        while (not exited or open_streams) and not killed_for:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                killed_for.append("timeout")
                break
            for key, _ in selector.select(timeout=remaining):
                fd = key.fd
                if fd == pidfd:
                    exited = True
                    selector.unregister(pidfd)
                    kill()  # whatever it left in its session goes too (and the pipes close)
                elif fd in kept:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        selector.unregister(fd)
                        open_streams -= 1
                        continue
                    room = output_bytes - len(kept[fd])
                    kept[fd] += chunk[:max(room, 0)]
                    if len(chunk) > room:
                        truncated[fd] = True
                        killed_for.append("output")
                        break
                else:  # stdin has room
                    try:
                        unsent = unsent[os.write(fd, unsent[:65536]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        unsent = unsent[:0]
                    if not unsent:
                        selector.unregister(fd)
                        proc.stdin.close()
    finally:
        if killed_for or not exited:
            kill()
        _, status = os.waitpid(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        selector.close()
        os.close(pidfd)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f and not f.closed:
                try:
                    f.close()
                except BrokenPipeError:
                    pass
    code = proc.returncode
    return Finished(exit_code=None if killed_for else (128 - code if code < 0 else code),
                    stdout=bytes(kept[out_fd]), stderr=bytes(kept[err_fd]), stdout_truncated=truncated[out_fd],
                    stderr_truncated=truncated[err_fd], killed_for=killed_for, wall_s=time.perf_counter() - started)
