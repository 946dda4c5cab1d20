"""Is the job still learning? A GRPO group whose returns are all equal has zero advantage: it
teaches nothing, and a job that plays only such groups spins without a trainer step. `SignalWatch`
sees every finished group, counts per env, says on the console why the groups carry no signal
(with the likely cause), logs the numbers, and tells the loop when to stop.

    >>> from cwm_rl.types import Span, Trajectory, Turn
    >>> def episode(group, ret, verdict):   # one generated token, graded like Math-v0 grades
    ...     turn = Turn(index=0, action="7", reward=ret, info={"verdict": verdict}, action_span=Span(start=1, end=2))
    ...     return Trajectory(task_id="t", env_id="cwm_rl/Math-v0", group_id=group, token_ids=[1, 2], loss_mask=[0, 1],
    ...                       logprobs=[0.0, -1.0], policy_versions=[-1, 0], turns=[turn], finish_reason="terminated",
    ...                       terminated=True, **{"return": ret})
    >>> watch = SignalWatch(stop_after=3, warn_every=2, max_tokens=32, say=print)
    >>> watch.add([episode("a", -1.0, "wrong"), episode("a", 1.0, "correct")])   # returns differ: signal
    >>> watch.add([episode(g, -1.0, "wrong") for g in "bbcc"])
    no learning signal in the last 2 groups in a row (...); the job stops at 3 (stop_without_signal_groups)
      cwm_rl/Math-v0: 2 groups, 4 episodes, every episode failed; returns -1 x4 ... -> likely cause: the tasks are too hard ...
    >>> watch.add([episode("d", -1.0, "format_error"), episode("d", -1.0, "format_error")])
    no learning signal in the last 3 groups in a row (...); stopping (stop_without_signal_groups=3)
    ...
    >>> watch.stop, watch.in_a_row, watch.metrics()["zero_advantage_share"]
    (True, 3, 0.75)

A group has a learning signal when its returns differ (the trainer's zero-advantage filter and
the buffer use the same rule). The streak of groups without one runs over all envs: one env with
signal keeps the job learning. The console message comes after `warn_every` groups in a row and
again each time the streak doubles; at `stop_after` the loop stops checkpointed
(`stop_reason` "no_learning_signal", `run_job` raises with this report). The likely cause is read
from the streak's episodes per env: the env's verdict in the last turn's info (Math and Trace
"correct"/"format_error", Code "passed"/"format_error"; without one, return > 0 counts as solved,
as in the eval), the finish reason, and whether the last turn used all of
`rollout.sampling.max_tokens`. Metrics (`metrics()`) cover the last `window` groups.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cwm_rl.types import Trajectory

SOLVED_VERDICTS = {"correct", "passed", "resolved"}
MOST = 0.5  # a share of the streak's episodes above which one symptom names the cause


@dataclass(frozen=True)
class GroupRecord:
    """What the watch keeps of one finished group."""

    env_id: str
    returns: tuple[float, ...]
    solved: int
    format_errors: int
    length_cuts: int
    env_errors: int

    @property
    def signal(self) -> bool:
        return max(self.returns) - min(self.returns) > 1e-8


def _solved(t: Trajectory) -> bool:
    info = t.turns[-1].info if t.turns else t.reward_details
    if "verdict" in info:
        return info["verdict"] in SOLVED_VERDICTS
    for key in ("resolved", "correct"):
        if isinstance(info.get(key), bool):
            return info[key]
    return t.return_ > 0


def _format_error(t: Trajectory) -> bool:
    info = t.turns[-1].info if t.turns else t.reward_details
    return info.get("verdict") == "format_error"


def _cut(t: Trajectory, max_tokens: int | None) -> bool:
    """Cut at the token limit: the context filled, or the last turn used all of max_tokens."""
    return t.finish_reason == "max_tokens" or bool(max_tokens and t.turns and len(t.turns[-1].action_span) >= max_tokens)


def record_group(group: list[Trajectory], max_tokens: int | None = None) -> GroupRecord:
    return GroupRecord(env_id=group[0].env_id, returns=tuple(t.return_ for t in group), solved=sum(map(_solved, group)),
                       format_errors=sum(map(_format_error, group)), length_cuts=sum(_cut(t, max_tokens) for t in group),
                       env_errors=sum(t.finish_reason in ("env_error", "timeout") for t in group))


@dataclass
class EnvStats:
    """Groups of one env, summed: counts, shares and the reward distribution."""

    groups: int = 0
    zero_advantage_groups: int = 0
    largest_group: int = 0
    episodes: int = 0
    solved: int = 0
    format_errors: int = 0
    length_cuts: int = 0
    env_errors: int = 0
    rewards: Counter = field(default_factory=Counter)  # return (rounded to 0.01) -> episodes

    def add(self, r: GroupRecord) -> None:
        self.groups += 1
        self.zero_advantage_groups += not r.signal
        self.largest_group = max(self.largest_group, len(r.returns))
        self.episodes += len(r.returns)
        self.solved += r.solved
        self.format_errors += r.format_errors
        self.length_cuts += r.length_cuts
        self.env_errors += r.env_errors
        self.rewards.update(round(x, 2) + 0.0 for x in r.returns)

    def share(self, count: int) -> float:
        return count / max(self.episodes, 1)

    def metrics(self, env_id: str) -> dict[str, float]:
        mean = sum(v * n for v, n in self.rewards.items()) / max(self.episodes, 1)
        return {f"reward_mean/{env_id}": mean, f"reward_min/{env_id}": min(self.rewards, default=0.0),
                f"reward_max/{env_id}": max(self.rewards, default=0.0),
                f"zero_advantage_share/{env_id}": self.zero_advantage_groups / max(self.groups, 1),
                f"solved_share/{env_id}": self.share(self.solved), f"format_error_share/{env_id}": self.share(self.format_errors),
                f"length_cut_share/{env_id}": self.share(self.length_cuts)}

    def describe(self, max_tokens: int | None) -> str:
        """One line: counts, outcome, reward distribution, symptoms and the likely cause."""
        outcome = ("every episode failed" if self.solved == 0 else "every episode succeeded" if self.solved == self.episodes
                   else f"{self.share(self.solved):.0%} of episodes succeeded")
        common = ", ".join(f"{v:g} x{n}" for v, n in self.rewards.most_common(3))
        mean = sum(v * n for v, n in self.rewards.items()) / max(self.episodes, 1)
        symptoms = [f"{self.share(n):.0%} {what}" for n, what in
                    ((self.length_cuts, f"cut at max_tokens ({max_tokens})" if max_tokens else "cut at the token limit"),
                     (self.format_errors, "verdict format_error"), (self.env_errors, "env error or timeout")) if n]
        return (f"{self.groups} groups, {self.episodes} episodes, {outcome}; returns {common} (min {min(self.rewards):g}, "
                f"mean {mean:g}, max {max(self.rewards):g})" + (f"; {', '.join(symptoms)}" if symptoms else "")
                + f" -> likely cause: {self.likely_cause(max_tokens)}")

    def likely_cause(self, max_tokens: int | None) -> str:
        if self.largest_group == 1:
            return "rollout.group_size is 1: a group of one has no baseline to beat; use 4 or more samples per task"
        if self.solved == self.episodes:
            return "the tasks are too easy for the model (every sample solves them): harder tasks (e.g. a higher difficulty)"
        if self.share(self.env_errors) > MOST:
            return ("the env fails, not the model: episodes end in an env error or timeout "
                    "(`cwm-rl rollouts list RUN_DIR --finish-reason env_error` shows them)")
        if self.share(self.length_cuts) > MOST:
            return (f"episodes are cut at max_tokens ({max_tokens} per turn) before the model answers: raise it (the env's "
                    "envs[i].max_tokens, or rollout.sampling.max_tokens for every env), or warm start with SFT (model.sft.steps) "
                    "so answers come sooner")
        if self.share(self.format_errors) > MOST:
            return ("a format the model never produces: most verdicts are format_error (the env's prompt says what it expects); "
                    "warm start with SFT (model.sft.steps) on the env's reference answers")
        if self.solved == 0:
            return "the tasks are too hard for the model: easier tasks (e.g. a lower difficulty) or an SFT warm start (model.sft.steps)"
        return ("every sample of a task scores alike (each task is always or never solved): sample more diversely "
                "(rollout.sampling.temperature) or more per task (rollout.group_size)")


class SignalWatch:
    """Finished groups in, console warnings, metrics and the stop decision out (see the module docstring)."""

    def __init__(self, stop_after: int = 512, warn_every: int = 32, max_tokens: int | None = None, window: int = 256,
                 say: Callable[[str], None] | None = None, log: Callable[[dict[str, float]], None] | None = None,
                 env_max_tokens: dict[str, int] | None = None):
        self.stop_after, self.warn_every, self.max_tokens = stop_after, warn_every, max_tokens
        self.env_max_tokens = env_max_tokens or {}  # envs of the mix with their own per-turn token limit
        self.say = say or (lambda text: None)
        self.log = log or (lambda metrics: None)
        self.recent: deque[GroupRecord] = deque(maxlen=window)  # metrics are over these
        self.streak: dict[str, EnvStats] = {}  # the groups without signal since the last one with it, per env
        self.in_a_row = 0
        self.totals: dict[str, EnvStats] = {}
        self.stop = False  # the loop stops when this turns True
        self._next_warning = warn_every

    def add(self, trajectories: list[Trajectory]) -> None:
        """A batch of finished groups; warns, logs and sets `stop` when the streak reaches a limit."""
        groups: dict[str, list[Trajectory]] = {}
        for t in trajectories:
            groups.setdefault(t.group_id or t.trajectory_id, []).append(t)
        for group in groups.values():
            record = record_group(group, self.env_max_tokens.get(group[0].env_id, self.max_tokens))
            self.recent.append(record)
            self.totals.setdefault(record.env_id, EnvStats()).add(record)
            if record.signal:
                if self._next_warning > self.warn_every > 0:  # it had warned
                    self.say(f"learning signal is back after {self.in_a_row} groups without one ({record.env_id})")
                self.in_a_row, self.streak, self._next_warning = 0, {}, self.warn_every
            else:
                self.in_a_row += 1
                self.streak.setdefault(record.env_id, EnvStats()).add(record)
        if self.stop_after and self.in_a_row >= self.stop_after and not self.stop:
            self.stop = True
            self.say(self.report())
            self.log(self.metrics())
        elif self.warn_every and self.in_a_row >= self._next_warning and not self.stop:
            while self._next_warning <= self.in_a_row:
                self._next_warning *= 2
            self.say(self.report())
            self.log(self.metrics())

    def report(self) -> str:
        """The streak in words: how long, and per env the outcome, reward distribution and likely cause."""
        if not self.in_a_row:
            return "every recent group had a learning signal"
        share = sum(not r.signal for r in self.recent) / len(self.recent)
        limit = (f"stopping (stop_without_signal_groups={self.stop_after})" if self.stop else
                 f"the job stops at {self.stop_after} (stop_without_signal_groups)" if self.stop_after else "")
        head = (f"no learning signal in the last {self.in_a_row} groups in a row (each group's returns all equal: zero advantage, "
                f"nothing to train on; zero-advantage share of the last {len(self.recent)} groups {share:.0%}); {limit}")
        return "\n".join([head.removesuffix("; ")] + [f"  {env}: {s.describe(self.env_max_tokens.get(env, self.max_tokens))}" for env, s in self.streak.items()])

    def metrics(self) -> dict[str, float]:
        """Scalars over the last `window` groups: zero_advantage_share, groups_without_signal_in_a_row, and per env
        reward_mean/min/max, zero_advantage_share, solved_share, format_error_share, length_cut_share (NAME/ENV_ID)."""
        per_env: dict[str, EnvStats] = {}
        for r in self.recent:
            per_env.setdefault(r.env_id, EnvStats()).add(r)
        out = {"zero_advantage_share": sum(not r.signal for r in self.recent) / max(len(self.recent), 1),
               "groups_without_signal_in_a_row": self.in_a_row}
        for env, stats in per_env.items():
            out.update(stats.metrics(env))
        return out

    def summary(self) -> dict[str, Any]:
        """For summary.json: the whole run's group counts per env, the last metrics, and the report of a streak at the end."""
        return {"groups": sum(s.groups for s in self.totals.values()),
                "zero_advantage_groups": sum(s.zero_advantage_groups for s in self.totals.values()),
                "groups_per_env": {env: s.groups for env, s in self.totals.items()},
                "zero_advantage_groups_per_env": {env: s.zero_advantage_groups for env, s in self.totals.items()},
                **self.metrics(), "report": self.report() if self.in_a_row else None}
