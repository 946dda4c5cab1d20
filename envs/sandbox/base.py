"""What every sandbox backend takes and returns: `Limits` in, `ExecResult` out.

Model-written code is hostile. A backend runs one command with no network, a read-only Debian
root (never the host's `/`), a private writable work dir, and the limits below; whatever the
program does, `run` returns an `ExecResult` saying how it ended and which limits it hit.
"""

from __future__ import annotations

import abc
import re
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The limits a result can name. "network" is not a limit but a refusal: the program tried to
# reach the network and could not (there is none).
LimitName = Literal["timeout", "cpu", "memory", "processes", "output", "file_size", "disk", "open_files", "network"]

WORK_DIR = "/work"  # the program's private writable directory (and its working directory)
SANDBOX_UID = 1000  # the program's uid and gid inside the sandbox, under every backend
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORK_DIR, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
       "PYTHONUNBUFFERED": "1", "TMPDIR": "/tmp"}  # the program's whole environment


class Limits(BaseModel):
    """Bounds for one command; every default is safe for a test run of a small program."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(default=10.0, gt=0, description="Wall-clock seconds before the whole process tree is killed.")
    cpu_s: int = Field(default=10, ge=1, description="CPU seconds per process (RLIMIT_CPU; SIGXCPU, then SIGKILL 1 s later).")
    memory_mb: int = Field(default=512, ge=16, description="Address space per process in MiB (RLIMIT_AS; a cgroup limit under Docker).")
    processes: int = Field(default=64, ge=1, description="Processes and threads the program may run at once.")
    file_size_mb: int = Field(default=64, ge=0, description="Largest file the program may write, in MiB (RLIMIT_FSIZE).")
    disk_mb: int = Field(default=128, ge=1, description="Size of the private work dir and /tmp (each a tmpfs), in MiB.")
    open_files: int = Field(default=256, ge=16, description="Open file descriptors per process (RLIMIT_NOFILE).")
    output_bytes: int = Field(default=1 << 20, ge=1024, description="Bytes kept per stream; a program that writes more is killed.")


class ExecResult(BaseModel):
    """How one sandboxed command ended. `exit_code` is the shell's: 128 + N when signal N killed it."""

    exit_code: int | None = Field(description="None when the sandbox killed it (timeout, output) before it exited.")
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    limits_hit: list[LimitName] = Field(default_factory=list)
    wall_s: float
    backend: str

    @property
    def ok(self) -> bool:
        """Exited 0 within every limit."""
        return self.exit_code == 0 and not self.limits_hit


class SandboxError(RuntimeError):
    """The sandbox itself could not run (missing bwrap or Docker, no root filesystem): not the program's fault."""


class SandboxUnavailable(RuntimeError):
    """The sandbox went away under a running episode: the Docker daemon does not answer (it stopped or is
    restarting), or it stopped or removed the episode's container. Nothing the program did; the episode
    cannot go on and should be played again once Docker is back.

    Not a SandboxError on purpose: an env may read a SandboxError from a step as the end of the agent's own
    container and score the episode (SWE-v0 does: its agent can stop a prebuilt image's container); this
    error must reach the env server, which ends the session with an error naming it instead."""


class Sandbox(abc.ABC):
    """Runs commands in isolation. One instance may serve many concurrent `run` calls (threads)."""

    backend: str

    @abc.abstractmethod
    def run(self, command: list[str] | str, files: dict[str, str | bytes] | None = None, stdin: str | bytes | None = None,
            limits: Limits | None = None) -> ExecResult:
        """Run `command` (argv, or a string for `sh -c`) in a fresh work dir holding `files` (paths relative to it)."""

    def close(self) -> None:
        """Release what the backend holds (containers, pools)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# What a failing program prints when a limit stopped it, per limit (checked on stderr and stdout).
_SIGNS: dict[str, re.Pattern] = {
    "memory": re.compile(r"MemoryError|Cannot allocate memory|out of memory|std::bad_alloc|failed to map segment", re.I),
    "processes": re.compile(r"Resource temporarily unavailable|can't start new thread|fork: retry|BlockingIOError", re.I),
    "file_size": re.compile(r"File too large", re.I),
    "disk": re.compile(r"No space left on device", re.I),
    "open_files": re.compile(r"Too many open files", re.I),
    "network": re.compile(r"Network is unreachable|Temporary failure in name resolution|Name or service not known|"
                          r"No address associated with hostname|Connection refused|Cannot assign requested address", re.I),
}
SIGXCPU, SIGXFSZ = 24, 25


def work_path(name: str) -> PurePosixPath:
    """Where a given file lands in the sandbox; names must be relative paths that stay inside the work dir."""
    if name.startswith("/") or ".." in PurePosixPath(name).parts or not name:
        raise ValueError(f"sandbox file names are relative paths inside the work dir, got {name!r}")
    return PurePosixPath(WORK_DIR) / name


def as_bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


def classify(exit_code: int | None, stdout: str, stderr: str, killed_for: list[str]) -> list[str]:
    """Which limits a finished command hit: what the sandbox killed it for, the signal that ended it,
    and the errors a program prints when a limit refuses it (a heuristic: named in the docs)."""
    hit = list(killed_for)
    if exit_code is not None and exit_code != 0:
        if exit_code == 128 + SIGXCPU:
            hit.append("cpu")
        if exit_code == 128 + SIGXFSZ:
            hit.append("file_size")
        text = stderr[-8192:] + "\n" + stdout[-2048:]
        hit += [name for name, sign in _SIGNS.items() if sign.search(text)]
    return sorted(set(hit), key=hit.index)
