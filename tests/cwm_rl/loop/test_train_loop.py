"""`train_loop` with stand-ins for the workers, trainer, store and sinks (a fast unit test; the real
path runs in tests/cwm_rl/loop/test_driver.py): async mode keeps refilling and collecting while a
trainer step runs, sync mode does not, the initial eval runs before the first groups and the RL clock, and the job
stops at exactly `steps` even though a step was under way when the limit was checked."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cwm_rl.config import load_config
from cwm_rl.loop import driver
from cwm_rl.loop.run import Run

ROOT = Path(__file__).resolve().parents[3]


class FakeWorkers:
    """Every fill starts one call; every collect finishes the calls in flight (one group each)."""

    def __init__(self, trainer):
        self.trainer, self.calls, self.fills_during_step, self.fills_before_eval = trainer, 0, [], 0
        self.pending, self.lost, self.evaluated, self.rl_clock_at_eval = [], None, False, []
        self.reloads_sent = 0  # reloads sent and not yet waited for

    def fill(self, tasks, budget, one_round=False):
        if one_round and self.pending:
            return
        if not self.evaluated:
            self.fills_before_eval += 1
        if self.trainer.in_step:
            self.fills_during_step[-1] += 1
            self.trainer.refilled.set()
        self.pending.append(self.calls)
        self.calls += 1

    def collect(self, timeout):
        time.sleep(0.01)
        done, self.pending = self.pending, []
        for call in done:
            yield call, [SimpleNamespace(trajectory_id=f"t{call}", num_generated_tokens=8, return_=1.0, turns=[])]

    def requeue_unavailable(self, request, trajectories):
        return trajectories, []

    def __len__(self):
        return 1

    def in_flight_groups(self):
        return len(self.pending)

    def pending_groups(self):
        return len(self.pending)

    def wait_reloads(self):
        self.reloads_sent = 0

    def reload(self, version, path, wait=False):
        self.reloads_sent += not wait


class FakeTrainer:
    """A step that lasts until the loop has refilled the workers twice, or 2 s (then it reports none)."""

    def __init__(self):
        self.step_count = self.policy_version = 0
        self.in_step, self.refilled = False, threading.Event()

    def publish(self, version):
        return f"v{version}"

    def step(self, batch):
        self.workers.fills_during_step.append(0)
        self.refilled.clear()
        self.in_step = True
        deadline = time.time() + 2
        while time.time() < deadline and self.workers.fills_during_step[-1] < 2:
            self.refilled.wait(0.05)
        self.in_step = False
        metrics = {"step": self.step_count}
        self.step_count += 1
        self.policy_version += 1
        return SimpleNamespace(metrics=metrics, trained_ids=[t.trajectory_id for t in batch], dropped_ids={}, records=[], skipped=False,
                               warnings=[])


class FakeBuffer(list):
    def add(self, trajectories):
        self.extend(trajectories)

    def ready(self, step_tokens, max_groups):
        return len(self) >= 2

    def take(self, step_tokens):
        taken = list(self)
        self.clear()
        return taken


def fake_run(mode: str, steps: int) -> tuple[Run, FakeWorkers, FakeTrainer]:
    config = load_config(ROOT / "configs/quickstart.yaml", overrides=[f"mode={mode}", f"steps={steps}",
                                                                     "eval.every_steps=0", "checkpoint_every=0"])
    trainer = FakeTrainer()
    workers = trainer.workers = FakeWorkers(trainer)
    nothing = lambda *a, **k: None  # noqa: E731
    run = Run(config, run_dir=Path("unused"), sinks=SimpleNamespace(say=nothing, log_step=nothing, set_status=nothing, eval_history=[]),
              started=time.time())
    run.trainer, run.workers, run.buffer = trainer, workers, FakeBuffer()
    run.store = SimpleNamespace(add=nothing, mark_dropped=nothing, mark_step=nothing)
    run.endpoints = SimpleNamespace(check=nothing)
    run.signal_watch = SimpleNamespace(add=nothing, stop=False, metrics=dict)
    return run, workers, trainer


@pytest.fixture
def no_eval(monkeypatch):
    def evaluate_and_log(run):
        run.workers.evaluated = True
        run.workers.rl_clock_at_eval.append(run.rl_started)
        run.sinks.eval_history.append({"step": run.trainer.step_count})
    monkeypatch.setattr(driver, "evaluate_and_log", evaluate_and_log)


def test_async_refills_the_workers_while_the_trainer_steps(no_eval):
    run, workers, trainer = fake_run("async", steps=3)
    driver.train_loop(run)
    assert trainer.step_count == 3 and run.stop_reason == "steps"  # not 4: a step was running when 3 was checked
    assert workers.fills_during_step == [2, 2, 2]  # every step overlapped with new calls
    assert workers.fills_before_eval == 0  # the initial eval played alone, before any group
    assert workers.rl_clock_at_eval == [None] and run.rl_started is not None  # and before the RL clock (max_minutes, rl_s)


def test_sync_waits_for_the_step_before_the_next_round(no_eval):
    run, workers, trainer = fake_run("sync", steps=2)
    driver.train_loop(run)
    assert trainer.step_count == 2 and run.stop_reason == "steps"
    assert workers.fills_during_step == [0, 0]  # the next round is played with the new weights
    assert workers.fills_before_eval == 0 and workers.rl_clock_at_eval == [None]


def test_an_eval_after_a_step_waits_for_the_reload_it_reports(monkeypatch):
    """Async, a step's reload is sent and not waited for; an eval right after it must play the new version, not
    the old weights (the object-store backend writes the weights out first: requests could slip in before)."""
    played_with_reloads_pending = []

    def evaluate(workers, *args, **kwargs):
        played_with_reloads_pending.append(workers.reloads_sent)
        return SimpleNamespace(step=kwargs["step"], policy_version=kwargs["policy_version"])

    monkeypatch.setattr(driver, "evaluate", evaluate)
    run, workers, trainer = fake_run("async", steps=3)
    run.config.eval.every_steps = 1
    run.tasks = SimpleNamespace(held_out={})
    run.sinks.log_eval = lambda result: run.sinks.eval_history.append({"step": result.step})
    driver.train_loop(run)
    assert len(played_with_reloads_pending) == 4 and trainer.step_count == 3  # the initial eval, one after every step
    assert played_with_reloads_pending == [0, 0, 0, 0], "an eval started while a reload was still on its way"
