"""Fault battery: a verifier that hangs or eats memory is killed at its limit, the episode is
scored (no credit, the reason in `info`), and the pool keeps its size."""

import time

import gymnasium as gym
import pytest

import envs  # noqa: F401  (registers the built-in envs)
from rewards.math import _verdict
from rewards.pool import VerifierPool, default_pool

POWER_TOWER = "9^{9^{9^{9^{9}}}}"  # sympy evaluates it in C: it never finishes


@pytest.mark.fault
def test_a_hanging_verifier_is_killed_the_episode_scored_and_the_pool_keeps_its_size(fault_report):
    env = gym.make("cwm_rl/Math-v0", verify_timeout_s=1.0)
    pool = default_pool()  # what the env grades with
    pool.start()
    size = len(pool.worker_pids())
    env.reset(seed=0)
    start = time.monotonic()
    _, reward, terminated, _, info = env.step(f"The answer is \\boxed{{{POWER_TOWER}}}")
    scored_s = time.monotonic() - start
    assert terminated and reward == env.unwrapped.wrong_reward
    assert info["verdict"] == "timeout" and "longer than 1 s" in info["reason"]
    assert scored_s < 10.0  # killed at its 1 s limit, not left running

    env.reset(seed=0)
    _, reward, *_ = env.step(env.unwrapped.reference_action())  # the next episode is graded normally
    recover_s = time.monotonic() - start - scored_s
    assert reward == env.unwrapped.correct_reward
    deadline = time.monotonic() + 30
    while len(pool.worker_pids()) < size and time.monotonic() < deadline:
        time.sleep(0.05)  # the replacement starts on a background thread
    assert len(pool.worker_pids()) == size
    fault_report("verifier_hang", affected=1, scored_as=info["verdict"], scored_s=round(scored_s, 2),
                 recover_s=round(recover_s, 2), pool_size_before=size, pool_size_after=len(pool.worker_pids()))


@pytest.mark.fault
def test_a_verifier_that_eats_memory_is_cut_off_and_scored_as_a_timeout(fault_report):
    with VerifierPool(num_workers=2, memory_mb=768, preload=()) as pool:
        pool.start()
        start = time.monotonic()
        result = pool.run(bytearray, 4 * 1024**3)  # a verifier asking for 4 GiB: far past the cap
        cut_s = time.monotonic() - start
        assert result.status == "memory", result
        verdict = _verdict(result, "x", "72", timeout_s=5.0)
        assert verdict.status == "timeout" and "memory" in verdict.reason and not verdict.correct
        assert pool.run(sum, [1, 2, 3]).value == 6
        recover_s = time.monotonic() - start - cut_s
        deadline = time.monotonic() + 30
        while len(pool.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(pool.worker_pids()) == 2
        fault_report("verifier_memory", affected=1, scored_as=verdict.status, cut_s=round(cut_s, 2),
                     recover_s=round(recover_s, 2), pool_size_after=len(pool.worker_pids()))
