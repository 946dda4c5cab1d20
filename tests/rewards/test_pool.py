"""VerifierPool: results, errors, hard timeouts, dead workers, threads, asyncio, shutdown.

The functions sent to workers are stdlib callables (pickled by reference, importable anywhere),
so these tests do not depend on how pytest names this module. Pools here preload nothing: the
math warm-up would only slow every worker start.
"""

import asyncio
import ctypes
import operator
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rewards.pool import VerifierPool, default_pool

# Exponential backtracking inside the C regex engine: no Python-level signal handler would run.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CATASTROPHIC = (r"(a+)+$", "a" * 64 + "!")


@pytest.fixture
def pool():
    with VerifierPool(num_workers=2, timeout_s=5.0, preload=()) as pool:
        yield pool


def _is_gone(pid: int, within_s: float = 3.0) -> bool:
    """Has `pid` exited? A zombie counts: an orphan waits for init, which may reap slowly."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (FileNotFoundError, ProcessLookupError):  # gone before, or while, /proc was read
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def test_run_returns_the_value_and_passes_kwargs(pool):
    result = pool.run(int, "ff", base=16)
    assert result.status == "ok"
    assert result.value == 255
    assert result.error is None
    assert result.elapsed_s > 0


def test_runs_in_another_process(pool):
    assert pool.run(os.getpid).value != os.getpid()


def test_exception_in_fn_is_an_error_with_its_text(pool):
    result = pool.run(int, "abc")
    assert result.status == "error"
    assert result.error == "ValueError: invalid literal for int() with base 10: 'abc'"
    assert pool.run(operator.mul, 6, 7).value == 42  # the worker survives an exception


def test_timeout_kills_the_worker_promptly_and_the_pool_recovers():
    with VerifierPool(num_workers=1, timeout_s=5.0, preload=()) as pool:
        old_pid = pool.run(os.getpid).value
        start = time.monotonic()
        result = pool.run(time.sleep, 60, timeout_s=0.5)
        waited = time.monotonic() - start
        assert result.status == "timeout"
        assert "0.5 s timeout" in result.error
        assert 0.5 <= waited < 3.0  # killed at its 0.5 s, far below the pool default of 5 s (margin for a loaded machine)
        assert _is_gone(old_pid), "the timed-out worker must be killed"
        after = pool.run(os.getpid)
        assert after.status == "ok"
        assert after.value != old_pid


def test_timeout_holds_for_code_stuck_in_c():
    with VerifierPool(num_workers=1, timeout_s=0.5, preload=()) as pool:
        pool.start()
        start = time.monotonic()
        result = pool.run(re.match, *CATASTROPHIC)
        assert result.status == "timeout"
        assert time.monotonic() - start < 4.0  # the regex alone would run for ever
        assert pool.run(operator.add, 1, 1).value == 2


def test_worker_that_exits_is_an_error_and_is_replaced(pool):
    result = pool.run(os._exit, 3)
    assert result.status == "error"
    assert "exited with code 3" in result.error
    assert pool.run(operator.add, 1, 2).value == 3


def test_worker_that_segfaults_is_an_error_and_is_replaced(pool):
    result = pool.run(ctypes.string_at, 0)
    assert result.status == "error"
    assert "SIGSEGV" in result.error
    assert pool.run(operator.add, 1, 2).value == 3


def test_workers_ignore_ctrl_c(pool):
    # Ctrl-C signals the whole process group; the parent, not the worker, decides what stops.
    pid = pool.run(os.getpid).value
    threading.Timer(0.2, os.kill, (pid, signal.SIGINT)).start()
    result = pool.run(time.sleep, 0.5)
    assert result.status == "ok", result.error
    assert pool.run(os.getpid).value == pid


def test_unpicklable_result_is_an_error(pool):
    result = pool.run(threading.Lock)
    assert result.status == "error"
    assert "could not be sent back" in result.error
    assert pool.run(operator.add, 1, 2).value == 3


def test_unpicklable_fn_raises_naming_the_fix(pool):
    with pytest.raises(TypeError, match="module-level function"):
        pool.run(lambda: 1)
    assert pool.run(operator.add, 1, 2).value == 3  # no worker was lost


def test_concurrent_calls_from_8_threads(pool):
    jobs = [(i, j) for i in range(8) for j in range(25)]
    with ThreadPoolExecutor(8) as threads:
        results = list(threads.map(lambda ij: pool.run(operator.mul, *ij), jobs))
    assert [r.value for r in results] == [i * j for i, j in jobs]
    assert all(r.status == "ok" for r in results)


def test_two_workers_run_in_parallel(pool):
    pool.start()
    start = time.monotonic()

    def timed(_):
        result = pool.run(time.sleep, 0.4)
        end = time.monotonic()
        return result, (end - result.elapsed_s, end)  # when a worker held the call

    with ThreadPoolExecutor(4) as threads:
        out = list(threads.map(timed, range(4)))
    assert all(r.status == "ok" for r, _ in out)
    assert time.monotonic() - start >= 0.8  # 4 sleeps on 2 workers: at least two rounds
    spans = [span for _, span in out]
    most_at_once = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert most_at_once == 2, spans  # two calls ran in parallel, never more than the 2 workers


def test_workers_start_lazily():
    with VerifierPool(num_workers=3, preload=()) as pool:
        assert len(pool.worker_pids()) == 0
        pool.run(operator.add, 1, 1)
        pool.run(operator.add, 1, 1)  # sequential calls reuse the warm worker
        assert len(pool.worker_pids()) == 1


async def test_arun_does_not_block_the_event_loop(pool):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    result = await pool.arun(time.sleep, 0.5)
    timed_out = await pool.arun(time.sleep, 60, timeout_s=0.3)
    task.cancel()
    assert result.status == "ok"
    assert timed_out.status == "timeout"
    assert ticks >= 5  # ~80 if the loop ran freely; 0 if a call blocked it (low bar: a loaded machine ticks slowly)


async def test_arun_calls_run_concurrently(pool):
    results = await asyncio.gather(*(pool.arun(operator.add, i, 1) for i in range(20)))
    assert [r.value for r in results] == list(range(1, 21))


def test_close_is_idempotent_and_kills_the_workers():
    pool = VerifierPool(num_workers=2, preload=())
    pool.start()
    pids = pool.worker_pids()
    assert len(pids) == 2
    pool.close()
    pool.close()
    assert pool.closed
    assert all(_is_gone(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(operator.add, 1, 1)


def test_close_cuts_off_a_call_in_flight():
    pool = VerifierPool(num_workers=1, timeout_s=30.0, preload=())
    pool.start()
    closer = threading.Timer(0.3, pool.close)
    closer.start()
    start = time.monotonic()
    result = pool.run(time.sleep, 20)
    assert result.status == "error"
    assert "closed" in result.error
    assert time.monotonic() - start < 10.0  # cut off, not the 20 s sleep


def test_workers_die_when_the_parent_is_killed():
    script = textwrap.dedent(
        """
        import os, time
        from rewards.pool import VerifierPool
        pool = VerifierPool(num_workers=1, preload=())
        print(pool.run(os.getpid).value, flush=True)
        pool.run(time.sleep, 600, timeout_s=600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    worker_pid = int(parent.stdout.readline())
    try:
        time.sleep(0.2)  # let the worker start sleeping
        parent.send_signal(signal.SIGKILL)  # no atexit, no daemon cleanup
        parent.wait(timeout=5)
        assert _is_gone(worker_pid, within_s=5.0), "a worker outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.stdout.close()
        if not _is_gone(worker_pid, within_s=0):
            os.kill(worker_pid, signal.SIGKILL)  # do not leave a stray worker behind


def test_a_preload_module_that_does_not_import_fails_loudly():
    with VerifierPool(num_workers=1, preload=("no_such_module_xyz",)) as pool:
        with pytest.raises(RuntimeError, match="no_such_module_xyz"):
            pool.run(operator.add, 1, 1)


def test_default_pool_is_shared_and_usable():
    assert default_pool() is default_pool()
    assert default_pool().run(operator.add, 2, 2).value == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_workers": 0}, "num_workers must be >= 1"),
        ({"timeout_s": 0}, "timeout_s must be > 0"),
        ({"timeout_s": -1.0}, "timeout_s must be > 0"),
    ],
)
def test_bad_arguments_raise_naming_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VerifierPool(**kwargs, preload=())


def test_bad_per_call_timeout_raises(pool):
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        pool.run(operator.add, 1, 1, timeout_s=0)


def test_per_call_overhead_is_small(pool):
    pool.run(operator.add, 0, 0)
    num_calls = 300
    start = time.perf_counter()
    for i in range(num_calls):
        pool.run(operator.add, i, 1)
    per_call_s = (time.perf_counter() - start) / num_calls
    assert per_call_s < 0.02  # measured ~0.15 ms on 2 idle cores; this only catches gross regressions (100x)


# ---- any entry point: nothing re-imports the caller's __main__ -------------------------------

# What a Gymnasium user writes: no `if __name__ == "__main__":` guard, the pool used at module
# level, from a thread that then ends, and again from the main thread.
NO_GUARD = textwrap.dedent(
    """
    import operator, threading
    from rewards.pool import VerifierPool
    pool = VerifierPool(num_workers=1, preload=())
    results = []
    thread = threading.Thread(target=lambda: results.append(pool.run(operator.add, 20, 1).value))
    thread.start(); thread.join()
    results.append(pool.run(operator.mul, 21, 2).value)
    print("RESULTS", results, flush=True)
    """
)


@pytest.mark.parametrize("entry", ["script", "stdin", "python -c", "python -m"])
def test_a_script_without_a_main_guard_can_use_the_pool(entry, tmp_path):
    (tmp_path / "user_script.py").write_text(NO_GUARD)
    argv, stdin = {
        "script": ([sys.executable, str(tmp_path / "user_script.py")], None),
        "stdin": ([sys.executable, "-"], NO_GUARD),
        "python -c": ([sys.executable, "-c", NO_GUARD], None),
        "python -m": ([sys.executable, "-m", "user_script"], None),
    }[entry]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), REPO_ROOT])}
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESULTS [21, 42]" in result.stdout
    assert result.stdout.count("RESULTS") == 1, "the script ran again in a worker"


def test_the_math_env_works_in_a_plain_script(tmp_path):
    """The reported case: a script that makes and steps cwm_rl/Math-v0 at module level."""
    script = tmp_path / "play_math.py"
    script.write_text(textwrap.dedent(
        """
        import gymnasium as gym
        import envs
        env = gym.make("cwm_rl/Math-v0")
        env.reset(seed=0)
        _, reward, *_ , info = env.step("\\\\boxed{4}")
        print("REWARD", reward, info["reason"])
        """
    ))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REWARD" in result.stdout and "gold" in result.stdout  # graded by math-verify, not an error


def test_a_notebook_can_use_the_pool(tmp_path):
    """A real Jupyter kernel (ipykernel, driven by nbclient) runs the cells."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(f"import sys; sys.path.insert(0, {REPO_ROOT!r})\n" + NO_GUARD),
        nbformat.v4.new_code_cell("print('AGAIN', pool.run(operator.sub, 50, 8).value); pool.close()"),
    ])
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(out.get("text", "") for cell in notebook.cells for out in cell.outputs)
    assert "RESULTS [21, 42]" in printed and "AGAIN 42" in printed, printed


def test_a_preload_modules_warm_up_error_is_named(tmp_path, monkeypatch):
    (tmp_path / "bad_warm_up.py").write_text("def warm_up_worker():\n    raise ValueError('no tables on this disk')\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the workers import it from the caller's sys.path
    with VerifierPool(num_workers=1, preload=("bad_warm_up",)) as pool:
        with pytest.raises(RuntimeError, match="ValueError: no tables on this disk"):
            pool.run(operator.add, 1, 1)


# ---- the memory cap, and the zygote's death ---------------------------------------------------


def test_a_call_past_the_memory_cap_is_cut_off_and_its_worker_replaced():
    with VerifierPool(num_workers=1, memory_mb=512, preload=()) as pool:
        pool.start()
        [old_pid] = pool.worker_pids()
        result = pool.run(bytearray, 2 * 1024**3)  # 2 GiB, 4x the cap
        assert result.status == "memory", result
        assert "512 MB" in result.error and "MemoryError" in result.error
        assert _is_gone(old_pid)
        assert pool.run(len, b"abc").value == 3  # the pool keeps its size
        assert len(pool.worker_pids()) == 1


def test_memory_mb_is_checked():
    with pytest.raises(ValueError, match="memory_mb must be >= 64"):
        VerifierPool(memory_mb=8, preload=())


def test_the_pool_recovers_when_its_zygote_is_killed():
    with VerifierPool(num_workers=2, preload=()) as pool:
        pool.start()
        pids = pool.worker_pids()
        os.kill(pool._zygote.process.pid, signal.SIGKILL)
        assert all(_is_gone(pid, within_s=5.0) for pid in pids), "workers outlived their zygote"
        result = pool.run(operator.add, 2, 3)
        assert result.value == 5, result  # a new zygote, new workers
        assert not set(pool.worker_pids()) & set(pids)


def test_a_users_own_rewards_package_does_not_break_the_pool(tmp_path, monkeypatch):
    """The zygote boots from this repository's `rewards`, whatever the caller's sys.path puts first."""
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "__init__.py").write_text("raise ImportError('the user project rewards package')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with VerifierPool(num_workers=1, preload=()) as pool:
        assert pool.run(operator.add, 2, 2).value == 4
