"""Where a step's wall time went: the per-step timeline in metrics.jsonl, TensorBoard and progress.png.

A step's interval runs from the previous step's log line to its own. Two lanes share it:

- the trainer lane (the driver's thread, in seconds that add up to `time/step_s`): `train` (a
  trainer step running), and while none runs: `publish`, `reload` (waiting for workers to load a
  version), `store` (writing trajectories), `eval`, `checkpoint`, `idle` (waiting for rollouts:
  the buffer is not ready) and `other` (the loop's own bookkeeping). Work done while a step trains
  overlaps it and is not counted again: only what holds the next step up is on this lane.
- the rollout lane (the workers): `rollout_idle` (no request in flight: the buffer is full, or the
  loop has not refilled it yet), and the busy rest split as the episodes collected in the interval
  spent it: `generate` (vLLM), `env` (resets and steps, verification excluded) and `verify` (an
  in-process env's `score`: the reward).

    >>> timeline = Timeline(start=0.0)
    >>> timeline.start_train(now=1.0); timeline.end_train(now=3.0)
    >>> with timeline.phase("publish", now=lambda: 3.0): pass
    >>> timeline.metrics(now=4.0)["time/train_s"], timeline.metrics(now=4.0)["time/idle_s"]
    (2.0, 0.0)

Which lane is full tells what bounds the run: a trainer lane mostly `train` with a busy rollout
lane means the two share the CPU; much `idle` means the trainer waits for rollouts (generation is
the bound); much `rollout_idle` means the workers wait for the trainer (training is the bound).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

TRAINER_LANE = ("train", "publish", "reload", "store", "eval", "checkpoint", "idle", "other")
ROLLOUT_LANE = ("generate", "env", "verify", "rollout_idle")
_END = object()


class Timeline:
    """Seconds per phase since the last logged step (see the module docstring)."""

    def __init__(self, start: float | None = None):
        self._reset(time.perf_counter() if start is None else start)

    def _reset(self, now: float) -> None:
        self.interval_start = now
        self.seconds: dict[str, float] = defaultdict(float)
        self.episode_seconds: dict[str, float] = defaultdict(float)  # summed over concurrent episodes
        self.train_start: float | None = None
        self.idle_since: float | None = None

    @property
    def training(self) -> bool:
        return self.train_start is not None

    def start_train(self, now: float | None = None) -> None:
        self.train_start = time.perf_counter() if now is None else now

    def end_train(self, now: float | None = None) -> None:
        if self.train_start is not None:
            now = time.perf_counter() if now is None else now
            self.seconds["train"] += now - max(self.train_start, self.interval_start)
            self.train_start = None

    @contextmanager
    def phase(self, name: str, now: Callable[[], float] = time.perf_counter) -> Iterator[None]:
        """Time the driver's work `name`; it counts only while no trainer step runs (else it overlaps `train`)."""
        started = now()
        try:
            yield
        finally:
            if not self.training:
                self.seconds[name] += now() - started

    def timed(self, items: Iterable[Any], name: str, now: Callable[[], float] = time.perf_counter) -> Iterator[Any]:
        """`items`, the time spent waiting for each (not the caller's work on it) counted as phase `name`."""
        iterator = iter(items)
        while True:
            with self.phase(name, now=now):
                item = next(iterator, _END)
            if item is _END:
                return
            yield item

    def workers_busy(self, busy: bool, now: float | None = None) -> None:
        """Whether the workers have requests in flight, as the loop sees it; idle stretches count as `rollout_idle`."""
        now = time.perf_counter() if now is None else now
        if not busy and self.idle_since is None:
            self.idle_since = now
        elif busy and self.idle_since is not None:
            self.seconds["rollout_idle"] += now - self.idle_since
            self.idle_since = None

    def add_rollouts(self, trajectories: Sequence[Any]) -> None:
        """The episode time of finished trajectories: generation, env, verification (summed over turns)."""
        for t in trajectories:
            for turn in t.turns:
                verify = turn.verify_s
                self.episode_seconds["generate"] += turn.generate_s
                self.episode_seconds["env"] += max(turn.env_s - verify, 0.0)
                self.episode_seconds["verify"] += verify

    def metrics(self, now: float | None = None) -> dict[str, float]:
        """`time/<phase>_s` for both lanes and `time/step_s`, the interval (each lane adds up to it)."""
        now = time.perf_counter() if now is None else now
        interval = max(now - self.interval_start, 0.0)
        seconds = dict(self.seconds)
        if self.training:  # a step still running at log time (none in the loop: it logs after the step)
            seconds["train"] = seconds.get("train", 0.0) + now - max(self.train_start, self.interval_start)
        if self.idle_since is not None:
            seconds["rollout_idle"] = seconds.get("rollout_idle", 0.0) + now - self.idle_since
        counted = sum(seconds.get(p, 0.0) for p in TRAINER_LANE if p != "other")
        out = {f"time/{p}_s": seconds.get(p, 0.0) for p in TRAINER_LANE if p != "other"}
        out["time/other_s"] = max(interval - counted, 0.0)
        rollout_idle = min(seconds.get("rollout_idle", 0.0), interval)
        busy = interval - rollout_idle
        episode_total = sum(self.episode_seconds.values())
        for p in ("generate", "env", "verify"):
            out[f"time/{p}_s"] = busy * self.episode_seconds.get(p, 0.0) / episode_total if episode_total else 0.0
        if not episode_total:  # nothing finished in the interval: the busy time is generation still under way
            out["time/generate_s"] = busy
        out["time/rollout_idle_s"] = rollout_idle
        out["time/step_s"] = interval
        return out

    def next_step(self, now: float | None = None) -> dict[str, float]:
        """The interval's metrics, then start the next interval."""
        now = time.perf_counter() if now is None else now
        out = self.metrics(now)
        idle_since = self.idle_since
        self._reset(now)
        if idle_since is not None:
            self.idle_since = now
        return out
