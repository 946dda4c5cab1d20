"""The bubblewrap backend (the default on Linux): a few milliseconds per run, no daemon.

Each run gets: the Debian root read-only as `/` (never the host's), fresh size-bounded tmpfs at
/work (its working directory, holding the given files) and /tmp, new user, pid, ipc, uts, net
and cgroup namespaces (no network at all, only a loopback that is down), no capabilities, an
empty environment, and the rlimits of `Limits`. The sandbox's pid 1 dies with it, so nothing the
program starts outlives the run.

Run as root, each run also gets its own unprivileged host uid, because the kernel does not
apply RLIMIT_NPROC to root: a fork bomb then meets the process limit and cannot starve other
runs. Run as another user, runs share that user's process count.
"""

from __future__ import annotations

import os
import random
import shutil

from envs.sandbox.base import ENV, SANDBOX_UID, WORK_DIR, ExecResult, Limits, Sandbox, SandboxError, as_bytes, classify, work_path
from envs.sandbox.process import run_limited
from envs.sandbox.rootfs import sandbox_root

HOST_UID_BASE, HOST_UID_SPAN = 1_500_000_000, 1 << 24  # host uids drawn per run when we are root


class BwrapSandbox(Sandbox):
    backend = "bwrap"

    def __init__(self, root: str | os.PathLike | None = None, limits: Limits | None = None):
        self.bwrap = shutil.which("bwrap")
        if self.bwrap is None:
            raise SandboxError("bubblewrap is missing: apt-get install bubblewrap (or use the docker backend)")
        self.setpriv, self.prlimit = shutil.which("setpriv"), shutil.which("prlimit")
        if self.setpriv is None or self.prlimit is None:
            raise SandboxError("setpriv and prlimit are missing: apt-get install util-linux")
        self.root = str(root or sandbox_root())
        self.limits = limits or Limits()

    def entry(self, limits: Limits, host_uid: int | None) -> list[str]:
        """What runs before bwrap: death with our process, as root a fresh unprivileged uid (so RLIMIT_NPROC
        applies), and the rlimits everything in the sandbox inherits. Two small execs rather than a Python
        `preexec_fn`, which forces a full fork of this process (87 ms instead of 29 ms per run from a 1 GiB parent)."""
        entry = [self.setpriv, "--pdeathsig=KILL"]
        if host_uid is not None:
            entry += [f"--reuid={host_uid}", f"--regid={host_uid}", "--clear-groups"]
        mb = 1 << 20
        return entry + ["--", self.prlimit, f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}", f"--as={limits.memory_mb * mb}",
                        f"--nproc={limits.processes + 2}",  # + bwrap's own two processes
                        f"--fsize={limits.file_size_mb * mb}", f"--nofile={limits.open_files}", "--core=0", "--"]

    def argv(self, command: list[str], limits: Limits, file_args: list[str]) -> list[str]:
        """The bwrap command line for one run (files are passed as inherited file descriptors)."""
        disk = str(limits.disk_mb << 20)
        args = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--ro-bind", self.root, "/", "--dev", "/dev", "--proc", "/proc",
                "--perms", "1777", "--size", disk, "--tmpfs", "/tmp",
                "--perms", "0777", "--size", disk, "--tmpfs", WORK_DIR, *file_args,
                "--chdir", WORK_DIR, "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
                "--clearenv"]
        for key, value in ENV.items():
            args += ["--setenv", key, value]
        return args + ["--", *command]

    def run(self, command: list[str] | str, files: dict[str, str | bytes] | None = None, stdin: str | bytes | None = None,
            limits: Limits | None = None) -> ExecResult:
        limits = limits or self.limits
        command = ["sh", "-c", command] if isinstance(command, str) else list(command)
        fds: list[int] = []
        try:
            file_args = self._file_args(files or {}, fds)
            host_uid = HOST_UID_BASE + random.randrange(HOST_UID_SPAN) if os.geteuid() == 0 else None
            # Inside, a NUL byte goes to stderr just before the command is exec'd: bwrap's own failures
            # (before it) come without it, and nothing the program does can remove it.
            started = ["sh", "-c", 'printf "\\000" >&2; exec "$@"', "sandbox"]
            argv = self.entry(limits, host_uid) + self.argv(started + command, limits, file_args)
            done = run_limited(argv, stdin=as_bytes(stdin) if stdin is not None else None, timeout_s=limits.timeout_s,
                               output_bytes=limits.output_bytes, pass_fds=tuple(fds), env={})
        finally:
            for fd in fds:
                os.close(fd)
        if not done.stderr.startswith(b"\0") and not done.killed_for:
            raise SandboxError(f"bubblewrap could not create the sandbox: {done.stderr.decode(errors='replace').strip()[-500:]} "
                               "(`cwm-rl doctor` checks bubblewrap; the root must be readable by other users)")
        stderr = (done.stderr[1:] if done.stderr.startswith(b"\0") else done.stderr).decode(errors="replace")
        stdout = done.stdout.decode(errors="replace")
        return ExecResult(exit_code=done.exit_code, stdout=stdout, stderr=stderr, stdout_truncated=done.stdout_truncated,
                          stderr_truncated=done.stderr_truncated, wall_s=done.wall_s, backend=self.backend,
                          limits_hit=classify(done.exit_code, stdout, stderr, done.killed_for))

    @staticmethod
    def _file_args(files: dict[str, str | bytes], fds: list[int]) -> list[str]:
        args, dirs = [], set()
        for name, content in files.items():
            path = work_path(name)
            for parent in reversed(path.parents):
                if str(parent).startswith(WORK_DIR + "/") and parent not in dirs:
                    dirs.add(parent)
                    args += ["--perms", "0777", "--dir", str(parent)]
            fd = os.memfd_create("sandbox-file")
            fds.append(fd)
            os.write(fd, as_bytes(content))
            os.lseek(fd, 0, os.SEEK_SET)
            args += ["--perms", "0666", "--file", str(fd), str(path)]
        return args

