"""The rollout buffer: finished groups waiting for the trainer, oldest first.

    >>> from cwm_rl.types import Trajectory
    >>> def episode(group, ret):  # one prompt token, one generated token
    ...     return Trajectory(task_id="t", env_id="e", group_id=group, token_ids=[1, 2], loss_mask=[0, 1],
    ...                       logprobs=[0.0, -1.0], policy_versions=[-1, 0], finish_reason="max_turns", **{"return": ret})
    >>> buffer = Buffer(signal_only=True)
    >>> buffer.add([episode("a", 1.0), episode("a", 1.0), episode("b", 0.0), episode("b", 1.0)])
    >>> len(buffer), buffer.signal_tokens()   # two groups; only b's returns differ
    (2, 2)
    >>> buffer.ready(step_tokens=2, max_groups=64)
    True
    >>> [t.group_id for t in buffer.take(step_tokens=2)]   # oldest first: a rides along with b
    ['a', 'a', 'b', 'b']

A step waits for `step_tokens` generated tokens in groups with a learning signal. With
`signal_only` (the trainer drops zero-advantage groups) only groups whose returns differ count;
the others ride along and the trainer drops them. A full buffer is ready too: its groups may all
lack signal, and the workers get no new work while it is full (backpressure).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cwm_rl.types import Trajectory


@dataclass
class Buffer:
    """Finished groups waiting for the trainer, oldest first (see the module docstring)."""

    signal_only: bool = True
    groups: deque[list[Trajectory]] = field(default_factory=deque)

    def add(self, trajectories: list[Trajectory]) -> None:
        by_group: dict[str, list[Trajectory]] = {}
        for t in trajectories:
            by_group.setdefault(t.group_id or t.trajectory_id, []).append(t)
        self.groups.extend(by_group.values())

    def _counts(self, group: list[Trajectory]) -> bool:
        return not self.signal_only or len({t.return_ for t in group}) > 1

    def signal_tokens(self) -> int:
        """Generated tokens in the groups a step counts (see the module docstring)."""
        return sum(sum(t.num_generated_tokens for t in g) for g in self.groups if self._counts(g))

    def ready(self, step_tokens: int, max_groups: int) -> bool:
        """Enough counted tokens for a step, or full."""
        return self.signal_tokens() >= step_tokens or len(self.groups) >= max_groups

    def take(self, step_tokens: float) -> list[Trajectory]:
        """Oldest groups until `step_tokens` counted tokens are taken (or all; math.inf takes all)."""
        taken: list[Trajectory] = []
        counted = 0
        while self.groups and counted < step_tokens:
            group = self.groups.popleft()
            taken += group
            if self._counts(group):
                counted += sum(t.num_generated_tokens for t in group)
        return taken

    def __len__(self) -> int:
        return len(self.groups)
