"""A process pool whose per-call limits are hard: a call that overruns its time or memory is killed with its worker.

Why this exists: verifiers run untrusted model output through libraries that can hang.
math-verify's own timeout is `signal.alarm`, which only works in the main thread (so not under
uvicorn, asyncio executors or Ray actors' threads) and cannot interrupt C code anyway: sympy
evaluating `9^{9^{9^{9^{9}}}}` sits in CPython's integer `pow` and never returns to the
interpreter. The only bound that always holds is killing the process, so every call runs in one
of `num_workers` long-lived worker processes and a call past its deadline gets its worker
SIGKILLed and replaced. Memory is bounded the same way: each worker's address space is capped
(`memory_mb`), a call that runs into the cap gets `status="memory"` and its worker is replaced.

How: each worker has its own socket pair; idle workers wait in a queue. `run` takes an idle
worker, sends the pickled job, and `poll`s until the deadline. On timeout the worker is killed
and the caller gets `status="timeout"` at once; a replacement starts on a background thread.
A worker that dies mid-call (segfault, `os._exit`) gives `status="error"` and is replaced too.
The deadline covers the call itself, not the wait for a free worker.

Workers are forked from the pool's own "zygote": a fresh interpreter (`python -c`, started with
`subprocess`) that imports the `preload` modules once and forks a worker on request, so a
respawned worker skips the imports. Unlike multiprocessing's spawn and forkserver, nothing
re-imports the caller's `__main__`: a script without an `if __name__ == "__main__":` guard, code
piped to `python -`, `python -c`, a notebook, a thread or a server can all use the pool. A
preload module may also define `warm_up_worker()`: each worker calls it once before it takes its
first job (math-verify spends 0.1-0.3 s on the first input of each new shape; a call's deadline
should not pay for that), and an import error there fails the start loudly, naming the error,
instead of every call quietly. Workers ignore SIGINT (Ctrl-C reaches the whole process group;
the parent decides what to do). The zygote exits, killing its workers, when its pool's process
ends (its control socket closes, even on SIGKILL), and workers get SIGKILL when the zygote dies.

`fn` must be a module-level function of an importable module (it is pickled by reference; a
function defined in a script's `__main__` is not importable in a worker), its arguments and
return value picklable. Not isolated: files, network. Workers bound time and memory; they are no
sandbox for hostile code.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import functools
import importlib
import json
import os
import pickle
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Literal, Sequence

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_START_TIMEOUT_S = 120.0  # a worker's imports and warm-up; generous for a loaded machine
_CLOSED = object()  # queue sentinel: wakes callers blocked on a closed pool
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `rewards` imports from


@dataclass(frozen=True)
class PoolResult:
    """What became of one call: its value, its exception text, or the limit it ran into."""

    status: Literal["ok", "timeout", "memory", "error"]
    value: Any = None  # fn's return value when ok
    error: str | None = None  # "ExcType: message" when error; a sentence when timeout or memory
    elapsed_s: float = 0.0  # from sending the job to the answer (or the kill)


@dataclass(eq=False)  # identity-hashed: workers live in a set
class _Worker:
    pid: int
    conn: Connection
    zygote: _Zygote

    def kill(self) -> None:
        self.zygote.kill(self.pid)

    def wait(self, timeout_s: float) -> int | None:
        """Its exit code once it has ended (negative: killed by that signal); None while it runs."""
        return self.zygote.wait(self.pid, timeout_s)


class VerifierPool:
    """`num_workers` processes running module-level functions under a hard per-call timeout and memory cap."""

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        preload: Sequence[str] = ("rewards.math", "math_verify"),
        memory_mb: int | None = 4096,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}; pass num_workers=1 or more")
        if memory_mb is not None and memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64 (a worker's whole address space), got {memory_mb}; "
                             "pass e.g. 4096, or None for no cap")
        _check_timeout(timeout_s)
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.preload = tuple(preload)
        self.memory_mb = memory_mb
        self._lock = threading.Lock()
        self._closed = False
        self._zygote: _Zygote | None = None  # started with the first worker
        self._zygote_start = threading.Lock()  # one start at a time: threads that find it dead wait for the new one
        self._finalizer: weakref.finalize | None = None  # ends the zygote if the pool is dropped unclosed
        self._live: set[_Worker] = set()  # every started worker not yet killed, busy or idle
        # One slot per worker; None means "not started yet" (workers start on first use). LIFO:
        # the warmest worker goes first, and workers beyond the concurrency in use never start.
        self._idle: queue.LifoQueue = queue.LifoQueue()
        for _ in range(num_workers):
            self._idle.put(None)
        self._executor: ThreadPoolExecutor | None = None

    # ---- public API ---------------------------------------------------------------------

    def run(self, fn: Callable, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> PoolResult:
        """Run `fn(*args, **kwargs)` in a worker; blocks. Thread-safe."""
        timeout_s = self.timeout_s if timeout_s is None else _check_timeout(timeout_s)
        try:
            job = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"cannot send {fn!r} to a worker ({type(exc).__name__}: {exc}); pass a module-level "
                "function and picklable arguments"
            ) from exc
        worker = self._acquire()
        start = time.monotonic()
        try:
            worker.conn.send_bytes(job)
            # poll returns early when the worker answers or its end of the socket closes (it died).
            reply = worker.conn.recv() if worker.conn.poll(timeout_s) else None
        except (EOFError, OSError):
            message = self._death_message(worker, fn)
            return PoolResult("error", error=message, elapsed_s=time.monotonic() - start)
        except BaseException:
            # Ctrl-C while waiting, or a reply that does not unpickle here: the worker's state
            # is unknown, so it goes; the pool keeps its size.
            self._discard(worker)
            raise
        elapsed = time.monotonic() - start
        if reply is None:
            self._discard(worker)
            message = f"call to {_name(fn)} exceeded its {timeout_s:g} s timeout; its worker was killed"
            return PoolResult("timeout", error=message, elapsed_s=elapsed)
        status, payload = reply
        if status == "memory":  # the worker exits after saying so: its heap is not to be trusted
            self._discard(worker)
            cap = f"its worker's {self.memory_mb} MB memory cap" if self.memory_mb else "memory"
            message = f"call to {_name(fn)} ran out of {cap} ({payload}); its worker was replaced"
            return PoolResult("memory", error=message, elapsed_s=elapsed)
        self._release(worker)
        if status == "ok":
            return PoolResult("ok", value=payload, elapsed_s=elapsed)
        return PoolResult("error", error=payload, elapsed_s=elapsed)

    async def arun(
        self, fn: Callable, *args: Any, timeout_s: float | None = None, **kwargs: Any
    ) -> PoolResult:
        """`run` on one of the pool's own threads, so the event loop never blocks."""
        call = functools.partial(self.run, fn, *args, timeout_s=timeout_s, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._threads(), call)

    def start(self) -> None:
        """Start every worker now (and the zygote, which imports `preload`) instead of on first use."""
        workers: list[_Worker] = []
        try:
            for _ in range(self.num_workers):
                workers.append(self._acquire())
        finally:
            for worker in workers:
                self._release(worker)

    def close(self) -> None:
        """Kill every worker and the zygote; calls in flight end with status "error". Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live, self._live = list(self._live), set()
            executor, self._executor = self._executor, None
            zygote, self._zygote = self._zygote, None
        self._idle.put(_CLOSED)
        for worker in live:
            worker.kill()
        if zygote is not None:
            zygote.close()  # reaps the workers it forked
        # Busy workers' sockets are closed by the threads using them; idle ones here.
        while True:
            try:
                slot = self._idle.get_nowait()
            except queue.Empty:
                break
            if isinstance(slot, _Worker):
                slot.conn.close()
        self._idle.put(_CLOSED)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int]:
        """Pids of the workers started and not yet killed (busy or idle): they start lazily, on demand."""
        with self._lock:
            return [w.pid for w in self._live]

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ---- workers ------------------------------------------------------------------------

    def _acquire(self) -> _Worker:
        slot = self._idle.get()
        if slot is _CLOSED:
            self._idle.put(_CLOSED)  # wake the next waiter too
            raise RuntimeError("this VerifierPool is closed; create a new one")
        if slot is None or slot.conn.poll(0):  # an idle worker sends nothing: readable means its socket closed (it died)
            if slot is not None:
                self._forget(slot)
            try:
                slot = self._spawn()
            except BaseException:
                self._idle.put(None)  # give the slot back so the pool does not shrink
                raise
        return slot

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.put(worker)
                return
        worker.conn.close()

    def _zygote_now(self) -> _Zygote:
        """The running zygote, started (again, if it died) on demand."""
        with self._zygote_start:
            with self._lock:
                if self._closed:
                    raise RuntimeError("this VerifierPool is closed; create a new one")
                zygote = self._zygote
            if zygote is not None and zygote.alive():
                return zygote
            fresh = _Zygote(self.preload, self.memory_mb)  # raises with the preload error, if any
            with self._lock:
                if self._closed:
                    fresh.close()
                    raise RuntimeError("this VerifierPool was closed while a worker was starting")
                self._zygote = fresh
                if zygote is not None:  # its workers died with it; their idle slots respawn when taken
                    self._live = {w for w in self._live if w.zygote is not zygote}
            if zygote is not None:
                zygote.close()
            if self._finalizer is not None:
                self._finalizer.detach()
            self._finalizer = weakref.finalize(self, fresh.close)
            return fresh

    def _spawn(self) -> _Worker:
        """Start a worker and wait until it has warmed up (outside any call's deadline)."""
        zygote = self._zygote_now()
        try:
            worker = zygote.fork()
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"the verifier pool's zygote process died ({exc}); the next call starts a new one") from exc
        with self._lock:
            if self._closed:
                worker.kill()
                worker.conn.close()
                raise RuntimeError("this VerifierPool was closed while a worker was starting")
            self._live.add(worker)
        status, detail = _handshake(worker.conn, lambda: f"it {_how_it_ended(worker.wait(1.0))}")
        if status != "ready":
            with self._lock:
                self._live.discard(worker)
            worker.kill()
            worker.wait(1.0)
            worker.conn.close()
            if self._closed:
                raise RuntimeError("this VerifierPool was closed while a worker was starting")
            raise RuntimeError(
                f"a verifier worker failed to start: {detail}; check that the preload modules "
                f"{list(self.preload)} import and warm up in a fresh process"
            )
        return worker

    def _discard(self, worker: _Worker) -> None:
        """Kill a worker now; reap it and start its replacement on a background thread."""
        worker.kill()
        threading.Thread(target=self._replace, args=(worker,), daemon=True, name="verifier-respawn").start()

    def _replace(self, old: _Worker) -> None:
        self._forget(old)
        try:
            self._release(self._spawn())
        except Exception:
            # Could not start one now: leave an empty slot; the next caller starts a worker
            # itself and sees the error if it still fails. (A closed pool needs no slot.)
            if not self._closed:
                self._idle.put(None)

    def _forget(self, worker: _Worker) -> None:
        with self._lock:
            self._live.discard(worker)
        worker.conn.close()
        worker.wait(1.0)

    def _death_message(self, worker: _Worker, fn: Callable) -> str:
        if self._closed:
            worker.conn.close()
            return f"call to {_name(fn)} was cut off: the pool was closed"
        code = worker.wait(1.0)  # its socket closed, so it is exiting: learn how
        self._discard(worker)
        return f"worker process {_how_it_ended(code)} during the call to {_name(fn)}; it has been replaced"

    def _threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("this VerifierPool is closed; create a new one")
            if self._executor is None:
                # One thread per worker: more would only wait on the idle queue.
                self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="verifier-pool")
            return self._executor


def _check_timeout(timeout_s: float) -> float:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}; pass a positive number like 5.0")
    return timeout_s


def _handshake(conn: Connection, if_closed: Callable[[], str]) -> tuple[str, Any]:
    """A starting process's first message: ("ready", None) or ("error", why); why is `if_closed()` if it died first."""
    try:
        if conn.poll(_START_TIMEOUT_S):
            return conn.recv()
        return "error", f"not ready in {_START_TIMEOUT_S:g} s"
    except (EOFError, OSError):
        return "error", if_closed()


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "closed its socket"
    if exitcode < 0 and -exitcode in signal.valid_signals():
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", repr(fn))


# ---- the zygote: a clean interpreter that forks workers ---------------------------------------

# Run by `python -c`: the caller's sys.path (so user modules import as they do in the caller),
# then the zygote loop. Nothing of the caller's __main__ is imported.
_ZYGOTE_BOOT = (
    "import json, sys; sys.path.insert(0, sys.argv[4]); from rewards.pool import _zygote_main; "
    "sys.path[:] = json.loads(sys.argv[1]); _zygote_main(int(sys.argv[2]), json.loads(sys.argv[3]))"
)


class _Zygote:
    """The parent's handle on one zygote process: fork a worker, kill one, learn how one ended.

    Requests go over one Unix socket, one at a time (a lock); a new worker's end of its socket
    pair travels with the "fork" request as SCM_RIGHTS ancillary data.
    """

    def __init__(self, preload: Sequence[str], memory_mb: int | None):
        self._lock = threading.Lock()
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn = Connection(os.dup(self._sock.fileno()))
        path = [p for p in sys.path] + ([_REPO_ROOT] if _REPO_ROOT not in sys.path else [])
        settings = {"preload": list(preload), "memory_mb": memory_mb}
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _ZYGOTE_BOOT, json.dumps(path), str(theirs.fileno()), json.dumps(settings), _REPO_ROOT],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            )
        except BaseException:
            self._conn.close()
            self._sock.close()
            raise
        finally:
            theirs.close()
        _zygotes.add(self)
        status, detail = _handshake(self._conn, lambda: f"its process exited with code {self.process.wait()} (see its stderr above)")
        if status != "ready":
            self.close()
            raise RuntimeError(
                f"a verifier worker failed to start: {detail}; check that the preload modules "
                f"{list(preload)} import in a fresh process (python -c 'import ...')"
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def fork(self) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                self._conn.send(("fork",))
                socket.send_fds(self._sock, [b"F"], [theirs.fileno()])
                pid = self._conn.recv()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if isinstance(pid, str):  # the fork failed (EAGAIN, ENOMEM): the zygote says why and goes on
            ours.close()
            raise RuntimeError(f"the verifier pool could not start a worker: {pid}")
        return _Worker(pid, Connection(ours.detach()), self)

    def kill(self, pid: int) -> None:
        """SIGKILL worker `pid`, unless the zygote already reaped it (its pid may be another process's now)."""
        self._ask(("kill", pid))

    def wait(self, pid: int, timeout_s: float) -> int | None:
        """Worker `pid`'s exit code once it has ended (it is reaped then), else None after `timeout_s`. Polls
        without holding the lock between tries, so other threads' requests go on meanwhile."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._ask(("wait", pid))
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(0.005)

    def _ask(self, request: tuple) -> Any:
        try:
            with self._lock:
                if self._conn.closed:
                    return -signal.SIGKILL  # closed by the pool: the zygote killed its workers
                self._conn.send(request)
                return self._conn.recv()
        except (EOFError, OSError):
            return -signal.SIGKILL  # the zygote died; its workers got SIGKILL with it (PR_SET_PDEATHSIG)

    def close(self) -> None:
        """End the zygote: it kills and reaps its workers when its control socket closes."""
        locked = self._lock.acquire(timeout=5.0)  # not while a request is half done (a wait takes <= 1 s)
        try:
            for closeable in (self._conn, self._sock):
                try:
                    closeable.close()
                except OSError:
                    pass
        finally:
            if locked:
                self._lock.release()
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _zygote_main(fd: int, settings: dict) -> None:
    """Import the preload modules, say "ready", then fork workers until the parent's socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    conn = Connection(os.dup(fd))
    preload, memory_mb = settings["preload"], settings["memory_mb"]
    try:
        for name in preload:
            importlib.import_module(name)
    except BaseException as exc:
        conn.send(("error", f"importing the preload modules raised {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    children: set[int] = set()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break  # the pool's process closed it, or died
        if request[0] == "fork":
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            try:
                pid = os.fork()
            except OSError as exc:
                os.close(fds[0])
                conn.send(f"fork() failed: {exc}")
                continue
            if pid == 0:
                conn.close()
                sock.close()
                code = 0
                try:
                    _worker_main(Connection(fds[0]), preload, memory_mb)
                except BaseException:
                    code = 1
                os._exit(code)
            os.close(fds[0])
            children.add(pid)
            conn.send(pid)
        elif request[0] == "wait":  # never blocks: the parent polls
            pid = request[1]
            code = _reap(pid) if pid in children else -signal.SIGKILL
            if code is not None:
                children.discard(pid)
            conn.send(code)
        elif request[0] == "kill":  # only a child not reaped yet: its pid cannot have been reused
            if request[1] in children:
                try:
                    os.kill(request[1], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            conn.send(None)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _reap(pid: int) -> int | None:
    """Reap child `pid` if it has ended: its exit code (negative: the signal), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -signal.SIGKILL
    return os.waitstatus_to_exitcode(status) if done else None


# ---- inside the worker process ----------------------------------------------------------


def _worker_main(conn: Connection, preload: Sequence[str], memory_mb: int | None) -> None:
    """Warm up, say "ready", then serve jobs until the parent closes the socket.

    Every failure of `fn` becomes an "error" reply; a failed warm-up is reported instead of "ready".
    A MemoryError (the address-space cap) is reported as "memory", and the worker then exits.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        if memory_mb is not None:
            cap = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        for name in preload:
            warm_up = getattr(importlib.import_module(name), "warm_up_worker", None)
            if warm_up is not None:
                warm_up()
    except BaseException as exc:
        conn.send(("error", f"warming up raised {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))  # a parent that left already makes this raise: the worker just ends
    while True:
        try:
            job = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            fn, args, kwargs = pickle.loads(job)
            reply = ("ok", fn(*args, **kwargs))
        except MemoryError as exc:
            reply = ("memory", f"MemoryError: {exc}" if str(exc) else "MemoryError")
        except BaseException as exc:  # SystemExit too: report it, keep serving
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as exc:  # the return value did not pickle
            conn.send(("error", f"the result could not be sent back ({type(exc).__name__}: {exc})"))
        if reply[0] == "memory":
            return


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent (the zygote, which exits with the pool's
    process) dies, even if the zygote was SIGKILLed and ran no exit hooks. The zygote is
    single-threaded, so "parent thread exits" (when PDEATHSIG fires) means "zygote exits"."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


# ---- the process-wide pool ----------------------------------------------------------------

_default: VerifierPool | None = None
_default_lock = threading.Lock()


def default_pool() -> VerifierPool:
    """The process-wide pool, created on first use, closed at exit: one worker per CPU core (at
    least 2; `CWM_RL_VERIFIER_WORKERS` overrides), 5 s timeout, 4 GiB per worker. Workers start
    only when used."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            num_workers = int(os.environ.get("CWM_RL_VERIFIER_WORKERS", 0)) or max(2, os.cpu_count() or 2)
            _default = VerifierPool(num_workers=num_workers)
            atexit.register(_default.close)
        return _default


_zygotes: weakref.WeakSet = weakref.WeakSet()  # every live zygote handle of this process


def _forget_default_after_fork() -> None:
    # A forked child must not share the parent's workers and sockets: it gets its own pool lazily. Its copies of
    # the zygotes' control sockets are closed, or a zygote would outlive its parent as long as the child lives.
    global _default, _default_lock
    _default, _default_lock = None, threading.Lock()
    for zygote in list(_zygotes):
        for closeable in (zygote._conn, zygote._sock):
            try:
                closeable.close()
            except OSError:
                pass


os.register_at_fork(after_in_child=_forget_default_after_fork)
