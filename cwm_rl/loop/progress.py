"""What a person watching `cwm-rl train` sees: event lines, and on a terminal a live panel.

On a terminal, a rich `Live` panel stays pinned below the scrolling lines. It holds the numbers
that say whether a run is healthy: step / steps, policy version, train reward (last step and
mean of the last 10), held-out accuracy (first -> latest), generated tokens/s, buffer fill, mean
staleness, elapsed time and the stop condition. Piped into a file or a CI log there is no panel:
the same numbers come as one plain line per step, so logs stay greppable.

    >>> view = ProgressView(enabled=True, total_steps=60, buffer_groups=16, title="runs/quickstart", live=False)
    >>> view.say("warm start: SFT 100 steps ...")
    [...s] warm start: SFT 100 steps ...
    >>> view.step({"step": 0, "new_policy_version": 1, "reward_mean": 0.25, "loss": 0.01, "buffer_groups": 3,
    ...            "tokens_per_s": 650.0, "step_time_s": 1.5})
    [...s] step    1  v1    reward +0.250  loss +0.0100  seqs   0  dropped stale 0  staleness 0.00  buffer 3/16  650 tok/s  1.50 s
    >>> view.close()
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table


class ProgressView:
    def __init__(self, *, enabled: bool, total_steps: int, buffer_groups: int, title: str, live: bool | None = None,
                 console: Console | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.buffer_groups = buffer_groups
        self.title = title
        self.started = time.time()
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.last: dict[str, Any] = {}
        self.rewards: deque[float] = deque(maxlen=10)
        self.evals: list[float] = []
        self.env_evals: dict[str, list[float]] = {}  # per env, when the job mixes several
        self.status = "starting"
        self.live: Live | None = None
        if enabled and (self.console.is_terminal if live is None else live):
            self.live = Live(get_renderable=self.panel, console=self.console, refresh_per_second=2, transient=False)
            self.live.start()

    def say(self, text: str) -> None:
        """One event line (above the panel on a terminal), stamped with the seconds since start."""
        if self.enabled:
            self.console.print(f"[{time.time() - self.started:7.1f}s] {text}", markup=False, highlight=False)

    def set_status(self, text: str) -> None:
        self.status = text

    def step(self, metrics: dict[str, Any]) -> None:
        """A trainer step's metrics: the panel's numbers, and one line."""
        self.last = metrics
        self.rewards.append(metrics["reward_mean"])
        self.status = "training"
        self.say(f"step {metrics['step'] + 1:>4}  v{metrics.get('new_policy_version', 0):<4} reward {metrics['reward_mean']:+.3f}  "
                 f"loss {metrics['loss']:+.4f}  seqs {metrics.get('sequences', 0):>3}  dropped stale {metrics.get('dropped_stale', 0)}  "
                 f"staleness {metrics.get('staleness_mean', 0.0):.2f}  buffer {metrics['buffer_groups']}/{self.buffer_groups}  "
                 f"{metrics['tokens_per_s']:.0f} tok/s  {metrics['step_time_s']:.2f} s")

    def eval(self, step: int, accuracy: float, per_env: dict[str, float]) -> None:
        self.evals.append(accuracy)
        if len(per_env) > 1:
            for env_id, value in per_env.items():
                self.env_evals.setdefault(env_id, []).append(value)
        detail = "" if len(per_env) == 1 else " (mean over envs): " + ", ".join(f"{k} {v:.1%}" for k, v in per_env.items())
        self.say(f"eval at step {step}: held-out greedy accuracy {accuracy:.1%}{detail}")

    def panel(self) -> Panel:
        """The live panel (also what a test renders)."""
        m = self.last
        done = int(m.get("step", -1)) + 1 if m else 0
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_column(style="bold")
        grid.add_column()
        reward = f"{self.rewards[-1]:+.3f} (last 10: {sum(self.rewards) / len(self.rewards):+.3f})" if self.rewards else "-"
        evals = _first_to_latest(self.evals)
        grid.add_row("step", f"{done} / {self.total_steps}", "policy version", str(int(m.get("new_policy_version", 0))) if m else "0")
        grid.add_row("train reward", reward, "held-out accuracy", evals)
        for env_id, values in self.env_evals.items():  # a mix: each env's held-out accuracy, first -> latest
            grid.add_row("", "", f"  {env_id}", _first_to_latest(values))
        grid.add_row("tokens/s", f"{m['tokens_per_s']:.0f}" if m else "-", "buffer",
                     f"{m['buffer_groups']}/{self.buffer_groups} groups" if m else "-")
        grid.add_row("staleness", f"{m.get('staleness_mean', 0.0):.2f}" if m else "-", "elapsed", f"{time.time() - self.started:.0f} s")
        bar = ProgressBar(total=max(self.total_steps, 1), completed=done, width=60)
        return Panel(Group(grid, bar), title=f"cwm-rl train: {self.title}", subtitle=self.status, expand=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _first_to_latest(values: list[float]) -> str:
    return "-" if not values else (f"{values[0]:.1%}" if len(values) == 1 else f"{values[0]:.1%} -> {values[-1]:.1%}")
