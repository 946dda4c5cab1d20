"""The rollout buffer: which groups count towards a step, oldest first, and when it is ready."""

from __future__ import annotations

from cwm_rl.loop.buffer import Buffer
from cwm_rl.types import Trajectory


def traj(group: str, ret: float, n: int = 3) -> Trajectory:
    return Trajectory(task_id="t", env_id="e", group_id=group, token_ids=[1] * (2 + n), loss_mask=[0, 0] + [1] * n,
                      logprobs=[0.0, 0.0] + [-1.0] * n, policy_versions=[-1, -1] + [0] * n, finish_reason="terminated",
                      terminated=True, **{"return": ret})


def test_buffer_counts_only_groups_with_signal_and_takes_oldest_first():
    buffer = Buffer()
    buffer.add([traj("a", 1), traj("a", 1)])  # no signal: same returns
    buffer.add([traj("b", 1), traj("b", -1)])
    buffer.add([traj("c", 0), traj("c", 1)])
    assert len(buffer) == 3 and buffer.signal_tokens() == 12
    taken = buffer.take(step_tokens=5)
    assert [t.group_id for t in taken] == ["a", "a", "b", "b"]  # the old no-signal group goes along, then b
    assert len(buffer) == 1 and buffer.signal_tokens() == 6


def test_buffer_without_the_zero_advantage_filter_counts_every_group():
    buffer = Buffer(signal_only=False)
    buffer.add([traj("a", 1), traj("a", 1)])
    buffer.add([traj("b", 1), traj("b", -1)])
    assert buffer.signal_tokens() == 12
    assert [t.group_id for t in buffer.take(step_tokens=5)] == ["a", "a"]


def test_buffer_is_ready_with_a_step_of_signal_or_when_full():
    buffer = Buffer()
    buffer.add([traj("a", 1), traj("a", 1)])
    assert not buffer.ready(step_tokens=6, max_groups=2)  # 0 counted tokens, 1 of 2 groups
    buffer.add([traj("b", 1), traj("b", 1)])
    assert buffer.ready(step_tokens=6, max_groups=2)  # still no signal, but full: backpressure must not deadlock
    signal = Buffer()
    signal.add([traj("c", 0), traj("c", 1)])
    assert signal.ready(step_tokens=6, max_groups=10) and not signal.ready(step_tokens=7, max_groups=10)
