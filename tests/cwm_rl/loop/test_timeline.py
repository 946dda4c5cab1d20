"""The per-step timeline: where the wall time between two logged steps went (cwm_rl/loop/timeline.py)."""

from __future__ import annotations

import pytest

from cwm_rl.loop.timeline import ROLLOUT_LANE, TRAINER_LANE, Timeline
from cwm_rl.types import Span, Trajectory, Turn


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def trajectory(generate_s: float, env_s: float, verify_s: float) -> Trajectory:
    turn = Turn(index=0, action="42", action_span=Span(start=0, end=0), generate_s=generate_s, env_s=env_s, verify_s=verify_s)
    return Trajectory(task_id="t", env_id="e", turns=[turn], finish_reason="max_turns")


def test_each_lane_adds_up_to_the_step_and_work_under_a_running_step_is_not_counted_twice():
    clock = Clock()
    timeline = Timeline(start=0.0)
    with timeline.phase("idle", now=clock):  # waiting for rollouts, no step running
        clock.now = 1.5
    timeline.start_train(now=1.5)
    with timeline.phase("store", now=clock):  # overlaps the step: not on the trainer lane
        clock.now = 2.0
    clock.now = 3.5
    timeline.end_train(now=3.5)
    with timeline.phase("publish", now=clock):
        clock.now = 3.7
    timeline.workers_busy(False, now=3.7)  # buffer full: the workers wait
    timeline.workers_busy(True, now=3.9)
    timeline.add_rollouts([trajectory(3.0, 1.0, 0.5), trajectory(1.0, 0.0, 0.0)])
    m = timeline.next_step(now=4.0)
    assert m["time/step_s"] == pytest.approx(4.0)
    assert (m["time/idle_s"], m["time/train_s"], m["time/store_s"], m["time/publish_s"]) == pytest.approx((1.5, 2.0, 0.0, 0.2))
    assert m["time/other_s"] == pytest.approx(0.3)
    assert sum(m[f"time/{p}_s"] for p in TRAINER_LANE) == pytest.approx(4.0)
    # rollout lane: 0.2 s idle, the busy 3.8 s split as the episodes spent theirs (generate 4 : env 0.5 : verify 0.5)
    assert m["time/rollout_idle_s"] == pytest.approx(0.2)
    assert (m["time/generate_s"], m["time/env_s"], m["time/verify_s"]) == pytest.approx((3.8 * 0.8, 3.8 * 0.1, 3.8 * 0.1))
    assert sum(m[f"time/{p}_s"] for p in ROLLOUT_LANE) == pytest.approx(4.0)
    # the next interval starts empty
    m2 = timeline.metrics(now=5.0)
    assert m2["time/step_s"] == pytest.approx(1.0) and m2["time/train_s"] == 0 and m2["time/other_s"] == pytest.approx(1.0)


def test_timed_counts_the_wait_for_each_item_not_the_work_on_it():
    clock = Clock()
    timeline = Timeline(start=0.0)

    def items():
        clock.now += 1.0  # waiting for the first item
        yield "a"
        clock.now += 0.5
        yield "b"

    seen = []
    for item in timeline.timed(items(), "idle", now=clock):
        clock.now += 2.0  # the caller's work on the item
        seen.append(item)
    assert seen == ["a", "b"] and timeline.metrics(now=clock.now)["time/idle_s"] == pytest.approx(1.5)
