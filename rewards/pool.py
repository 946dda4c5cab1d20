"""A process pool whose per-call timeouts are hard: a call that overruns is killed with its worker.

Why this exists: verifiers run untrusted model output through libraries that can hang.
math-verify's own timeout is `signal.alarm`, which only works in the main thread (so not under
uvicorn, asyncio executors or Ray actors' threads) and cannot interrupt C code anyway: sympy
evaluating `9^{9^{9^{9^{9}}}}` sits in CPython's integer `pow` and never returns to the
interpreter. The only bound that always holds is killing the process, so every call runs in one
of `num_workers` long-lived worker processes and a call past its deadline gets its worker
SIGKILLed and replaced.

How: each worker has its own `Pipe`; idle workers wait in a queue. `run` takes an idle worker,
sends the pickled job, and `poll`s the pipe until the deadline. On timeout the worker is killed
and the caller gets `status="timeout"` at once; a replacement starts on a background thread.
A worker that dies mid-call (segfault, `os._exit`) gives `status="error"` and is replaced too.
The deadline covers the call itself, not the wait for a free worker.

Workers come from a "forkserver" context: forking a clean server process is safe from a
threaded parent (uvicorn, Ray), and `preload` modules are imported once in that server, so a
respawned worker skips the imports. The forkserver (and its preload list) is shared by the whole
process: the first pool to start it decides what it preloads. A preload module may also define
`warm_up_worker()`: each worker calls it once before it takes its first job (math-verify spends
0.1-0.3 s on the first input of each new shape; a call's deadline should not pay for that), and
an import error there fails the start loudly instead of every call quietly. Workers ignore SIGINT
(Ctrl-C reaches the whole process group; the parent decides what to do), are daemons, and on
Linux get SIGKILL when their parent dies, so even a SIGKILLed trainer leaves no stuck workers.

`fn` must be a module-level function (it is pickled by reference), its arguments and return value
picklable. Like any spawn/forkserver pool, a script that uses it needs an
`if __name__ == "__main__":` guard. Not isolated: memory, files, network. Workers bound time,
they are no sandbox for hostile code.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import functools
import importlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_START_TIMEOUT_S = 120.0  # a worker's imports and warm-up; generous for a loaded machine
_CLOSED = object()  # queue sentinel: wakes callers blocked on a closed pool


@dataclass(frozen=True)
class PoolResult:
    """What became of one call: its value, its exception text, or a timeout."""

    status: Literal["ok", "timeout", "error"]
    value: Any = None  # fn's return value when ok
    error: str | None = None  # "ExcType: message" when error; a sentence when timeout
    elapsed_s: float = 0.0  # from sending the job to the answer (or the kill)


@dataclass(eq=False)  # identity-hashed: workers live in a set
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection


class VerifierPool:
    """`num_workers` processes running module-level functions under a hard per-call timeout."""

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        preload: Sequence[str] = ("rewards.math", "math_verify"),
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}; pass num_workers=1 or more")
        _check_timeout(timeout_s)
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.preload = tuple(preload)
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(preload))
        self._lock = threading.Lock()
        self._closed = False
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
            # poll returns early when the worker answers or its end of the pipe closes (it died).
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
        self._release(worker)
        status, payload = reply
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
        """Start every worker now (and the forkserver, which imports `preload`) instead of on first use."""
        workers: list[_Worker] = []
        try:
            for _ in range(self.num_workers):
                workers.append(self._acquire())
        finally:
            for worker in workers:
                self._release(worker)

    def close(self) -> None:
        """Kill every worker; calls in flight end with status "error". Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live, self._live = list(self._live), set()
            executor, self._executor = self._executor, None
        self._idle.put(_CLOSED)
        for worker in live:
            _kill(worker.process)
        for worker in live:
            worker.process.join(timeout=1.0)
        # Busy workers' pipes are closed by the threads using them; idle ones here.
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
            return [w.process.pid for w in self._live]

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
        if slot is None or not slot.process.is_alive():
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

    def _spawn(self) -> _Worker:
        """Start a worker and wait until it has warmed up (outside any call's deadline)."""
        if self._closed:
            raise RuntimeError("this VerifierPool is closed; create a new one")
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.preload), daemon=True, name="verifier-worker"
        )
        process.start()
        child_conn.close()
        worker = _Worker(process, parent_conn)
        with self._lock:
            if self._closed:
                _kill(process)
                parent_conn.close()
                raise RuntimeError("this VerifierPool was closed while a worker was starting")
            self._live.add(worker)
        try:
            ready = parent_conn.poll(_START_TIMEOUT_S)
            status, detail = parent_conn.recv() if ready else ("error", f"not ready in {_START_TIMEOUT_S:g} s")
        except (EOFError, OSError):
            process.join(timeout=1.0)
            status, detail = "error", f"it {_how_it_ended(process.exitcode)}"
        if status != "ready":
            with self._lock:
                self._live.discard(worker)
            _kill(process)
            parent_conn.close()
            if self._closed:
                raise RuntimeError("this VerifierPool was closed while a worker was starting")
            raise RuntimeError(
                f"a verifier worker failed to start ({detail}); check that the preload modules "
                f"{list(self.preload)} import and warm up in a fresh process"
            )
        return worker

    def _discard(self, worker: _Worker) -> None:
        """Kill a worker now; reap it and start its replacement on a background thread."""
        _kill(worker.process)
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
        worker.process.join(timeout=1.0)

    def _death_message(self, worker: _Worker, fn: Callable) -> str:
        if self._closed:
            worker.conn.close()
            return f"call to {_name(fn)} was cut off: the pool was closed"
        worker.process.join(timeout=1.0)  # its pipe closed, so it is exiting: learn how
        code = worker.process.exitcode
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


def _kill(process: multiprocessing.process.BaseProcess) -> None:
    try:
        process.kill()
    except (ValueError, ProcessLookupError):
        pass  # already closed or gone


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "closed its pipe"
    if exitcode < 0 and -exitcode in signal.valid_signals():
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", repr(fn))


# ---- inside the worker process ----------------------------------------------------------


def _worker_main(conn: multiprocessing.connection.Connection, preload: Sequence[str]) -> None:
    """Warm up, say "ready", then serve jobs until the parent closes the pipe.

    Every failure of `fn` becomes an "error" reply; a failed warm-up is reported instead of "ready".
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _let_forkserver_exit()
    _die_with_parent()
    try:
        for name in preload:
            warm_up = getattr(importlib.import_module(name), "warm_up_worker", None)
            if warm_up is not None:
                warm_up()
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
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
        except BaseException as exc:  # SystemExit too: report it, keep serving
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as exc:  # the return value did not pickle
            conn.send(("error", f"the result could not be sent back ({type(exc).__name__}: {exc})"))


def _let_forkserver_exit() -> None:
    """Drop this worker's copy of the forkserver's keep-alive pipe.

    multiprocessing gives every forkserver child the write end of the pipe whose EOF tells the
    forkserver that the main process is gone. A stuck worker holding it would keep the forkserver
    alive after the main process died, and so itself (see `_die_with_parent`). Workers start no
    processes, so they close it. (`_forkserver_alive_fd` is private; tests catch a change.)
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass
    server._forkserver_alive_fd = None


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent (the forkserver, which exits with the main
    process) dies, even if the main process was SIGKILLed and ran no exit hooks."""
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
    least 2; `CWM_RL_VERIFIER_WORKERS` overrides), 5 s timeout. Workers start only when used."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            num_workers = int(os.environ.get("CWM_RL_VERIFIER_WORKERS", 0)) or max(2, os.cpu_count() or 2)
            _default = VerifierPool(num_workers=num_workers)
            atexit.register(_default.close)
        return _default


def _forget_default_after_fork() -> None:
    # A forked child must not share the parent's workers and pipes: it gets its own pool lazily.
    global _default, _default_lock
    _default, _default_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_default_after_fork)
