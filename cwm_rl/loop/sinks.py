"""Where a job's numbers go: the console (`progress.py`), metrics.jsonl, TensorBoard, W&B, and at
the end summary.json and progress.png.

    >>> import tempfile
    >>> run_dir = Path(tempfile.mkdtemp())
    >>> sinks = Sinks(JobConfig(logging={"tensorboard": False, "progress": False}), run_dir)
    >>> sinks.open()
    >>> sinks.log_step({"step": 0, "loss": 0.5, "reward_mean": 0.25, "buffer_groups": 2, "tokens_per_s": 600.0,
    ...                 "step_time_s": 1.0, "skipped": False})
    >>> (run_dir / "metrics.jsonl").read_text().splitlines()   # scalars only, at the step they belong to
    ['{"step": 0.0, "loss": 0.5, "reward_mean": 0.25, "buffer_groups": 2.0, "tokens_per_s": 600.0, "step_time_s": 1.0}']
    >>> sinks.plot(); (run_dir / "progress.png").exists()
    True
    >>> sinks.close()

Every scalar of a step or an eval goes to every sink under the same name, at the trainer step it
belongs to, so metrics.jsonl, TensorBoard and W&B always agree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cwm_rl.config import JobConfig
from cwm_rl.loop.evaluation import HeldOutEval
from cwm_rl.loop.progress import ProgressView


@dataclass
class Counts:
    """Running totals of a job, in its summary."""

    trajectories_stored: int = 0
    trajectories_trained: int = 0
    trajectories_dropped_stale: int = 0
    trajectories_dropped_other: int = 0
    generated_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Sinks:
    """The console view and the metric files of one run (see the module docstring)."""

    def __init__(self, config: JobConfig, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.view = ProgressView(enabled=config.logging.progress, total_steps=config.steps, buffer_groups=config.buffer_groups,
                                 title=str(run_dir))
        self.history: list[dict[str, float]] = []  # trainer steps' scalars
        self.eval_history: list[dict[str, Any]] = []
        self.tensorboard = None
        self.wandb = None
        self.metrics_file = None

    def open(self) -> None:
        """Open the files (after the run dir is known to be this run's)."""
        if self.config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        if self.config.logging.wandb_project:
            import wandb

            self.wandb = wandb.init(project=self.config.logging.wandb_project, mode=self.config.logging.wandb_mode,
                                    dir=str(self.run_dir), config=self.config.model_dump(mode="json"))
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a")

    def say(self, text: str) -> None:
        self.view.say(text)

    def set_status(self, text: str) -> None:
        self.view.set_status(text)

    def log_step(self, metrics: dict[str, Any]) -> None:
        self.history.append(self._write(metrics, metrics["step"]))
        self.view.step(metrics)

    def log_eval(self, result: HeldOutEval) -> None:
        entry = result.metrics()
        self.eval_history.append(entry)
        self._write(entry, result.step)
        self.view.eval(result.step, result.accuracy, result.per_env)

    def log_signal(self, metrics: dict[str, Any], step: int) -> None:
        """The learning-signal watch's scalars between steps (a job without signal may make none), at trainer step `step`."""
        self._write({"step": step, **metrics}, step)

    def _write(self, metrics: dict[str, Any], step: int) -> dict[str, float]:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(scalars) + "\n")
            self.metrics_file.flush()
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        return scalars

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    def plot(self) -> None:
        """progress.png: train reward per step and held-out accuracy per eval (per env in a mix); below, where
        each step's wall time went (the trainer lane of `cwm_rl/loop/timeline.py`, and the workers' idle time)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        timed = [h for h in self.history if "time/step_s" in h]
        fig, axes = plt.subplots(2 if timed else 1, 1, figsize=(7, 7 if timed else 4), squeeze=False)
        ax = axes[0][0]
        if self.history:
            ax.plot([h["step"] + 1 for h in self.history], [h["reward_mean"] for h in self.history], label="train reward (mean)", alpha=0.6)
        steps = [e["step"] for e in self.eval_history]
        env_ids = [spec.id for spec in self.config.envs]
        if len(env_ids) == 1:
            ax.plot(steps, [e["eval_accuracy"] for e in self.eval_history], "o-", label="held-out accuracy (greedy)")
        for env_id in env_ids if len(env_ids) > 1 else []:  # a mix: one curve per env
            key = f"eval_accuracy/{env_id}"
            ax.plot(steps, [e.get(key, float("nan")) for e in self.eval_history], "o-", label=f"held-out accuracy: {env_id}")
        ax.set_xlabel("trainer step")
        ax.set_title(f"{self.run_dir.name}: {self.config.mode} GRPO")
        ax.legend()
        ax.grid(alpha=0.3)
        if timed:
            plot_timeline(axes[1][0], timed)
        fig.tight_layout()
        fig.savefig(self.run_dir / "progress.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        self.view.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.metrics_file is not None:
            self.metrics_file.close()


def plot_timeline(ax: Any, history: list[dict[str, float]]) -> None:
    """Stacked seconds of each step's trainer lane, and the workers' idle seconds as a line."""
    groups = {"train": ["train"], "waiting for rollouts": ["idle"], "eval + checkpoint": ["eval", "checkpoint"],
              "publish + reload": ["publish", "reload"], "store + loop": ["store", "other"]}
    x = [h["step"] + 1 for h in history]
    ax.stackplot(x, *([sum(h.get(f"time/{p}_s", 0.0) for p in parts) for h in history] for parts in groups.values()),
                 labels=list(groups), alpha=0.8)
    ax.plot(x, [h.get("time/rollout_idle_s", 0.0) for h in history], "k--", lw=1, label="workers idle (buffer full)")
    mean = {k: sum(h.get(f"time/{k}_s", 0.0) for h in history) / len(history) for k in ("step", "train", "idle", "generate")}
    ax.set_title(f"where each step's time went: {mean['step']:.2f} s a step, {mean['train']:.2f} s training, "
                 f"{mean['idle']:.2f} s waiting for rollouts", fontsize=9)
    ax.set_xlabel("trainer step")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
