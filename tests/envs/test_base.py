import asyncio
import threading
import time

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

from cwm_rl.types import Task
from envs import list_text_envs, make_env
from envs.base import TextEnv
from envs.registry import BUILTIN_ENVS


@pytest.mark.parametrize("env_id", sorted(BUILTIN_ENVS))
def test_every_builtin_env_passes_gymnasiums_checker(env_id):
    assert env_id in list_text_envs()
    env = gym.make(env_id).unwrapped
    check_env(env)  # raises on any API violation
    env.close()


def test_order_is_enforced():
    env = make_env("cwm_rl/Echo-v0", num_rounds=1)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("x")
    env.reset(seed=0)
    env.step("x")
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("x")
    with pytest.raises(TypeError, match="str"):
        env.reset(seed=0) and env.step(42)


def test_task_option_and_bad_options():
    env = make_env("cwm_rl/Echo-v0")
    obs, info = env.reset(options={"task": {"id": "mine", "prompt": "Repeat exactly: one", "answer": ["one", "two"]}})
    assert obs == [{"role": "user", "content": "Repeat exactly: one"}]
    assert info == {"task_id": "mine"}
    with pytest.raises(ValueError, match="not a valid Task"):
        env.reset(options={"task": {"prompt": "no id"}})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"tsak": {}})


def test_max_turns_truncates_and_is_recorded():
    env = make_env("cwm_rl/Echo-v0", num_rounds=5, max_turns=2)
    env.reset(seed=1)
    assert env.step("a")[3] is False
    obs, reward, terminated, truncated, info = env.step("b")
    assert (terminated, truncated, info["truncated_reason"]) == (False, True, "max_turns")
    state = env.state()
    assert state["num_turns"] == 2 and state["done"] is True
    assert [m["role"] for m in state["transcript"]] == ["user", "assistant", "user", "assistant", "user"]


def test_state_is_json_and_close_is_idempotent():
    import json

    env = make_env("cwm_rl/Echo-v0")
    env.reset(seed=3)
    json.dumps(env.state())
    env.close()
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()


class SlowEnv(TextEnv):
    """Blocks in step like an env that runs a test suite."""

    def sample_task(self, rng) -> Task:
        return Task(id="slow", prompt="wait")

    def respond(self, action):
        time.sleep(0.3)
        return [], 1.0, True, False, {"thread": threading.current_thread().name}


async def test_async_twins_do_not_block_the_event_loop():
    env = SlowEnv()
    await env.areset(seed=0)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    _, reward, terminated, _, info = await env.astep("go")
    tick_task.cancel()
    assert reward == 1.0 and terminated
    assert info["thread"] != threading.main_thread().name
    assert ticks >= 3  # the loop kept running while the step slept in its thread (~30 ticks idle; 0 if blocked)


def test_make_env_errors_are_clear():
    with pytest.raises(ValueError, match="unknown env id 'cwm_rl/Nope-v0'.*cwm_rl/Math-v0"):
        make_env("cwm_rl/Nope-v0")
    with pytest.raises(ValueError, match="bad arguments"):
        make_env("cwm_rl/Echo-v0", no_such_kwarg=1)
    with pytest.raises(ValueError, match="not a cwm-rl text env"):
        make_env("CartPole-v1")
    with pytest.raises(ValueError, match="pass max_turns instead"):
        make_env("cwm_rl/Echo-v0", max_episode_steps=3)
