"""The group page's data: the G samples of one task, sampled together, side by side with their advantages.

A sample's advantage is the trainer's (its training record in the store) when it was trained;
otherwise (still buffered, dropped, or a store without training records) it is computed here as
its return minus the group's mean return, and labelled so: the page never passes one off as the
other. GRPO's trainer may also divide by the group's standard deviation; the computed one does not.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

from cwm_rl.viewer import queries
from cwm_rl.viewer.runs import Run

TRAINER = "trainer"
COMPUTED = "return - group mean"


def group_page(run: Run, group_id: str) -> dict[str, Any]:
    samples = queries.group(run.store, group_id)
    returns = [row["return"] for row, _, _ in samples]
    mean = statistics.fmean(returns)
    out = []
    for row, t, training in samples:
        advantage, source = (training[1], TRAINER) if training else (row["return"] - mean, COMPUTED)
        out.append({"row": row, "advantage": advantage, "advantage_source": source,
                    "trained_step": training[0] if training else None,
                    "turns": [{"index": turn["index"], "action": turn["action"], "reward": turn["reward"],
                               "observation": turn.get("observation", []), "info": turn.get("info", {})}
                              for turn in t.get("turns", [])],
                    "reward_details": t.get("reward_details", {})})
    first = samples[0][1]
    prompt = list(itertools.takewhile(lambda m: m["role"] != "assistant", first.get("messages", [])))
    return {"group_id": group_id, "env_id": first["env_id"], "task_id": first["task_id"], "prompt": prompt,
            "mean_return": mean, "std_return": statistics.pstdev(returns), "num_samples": len(samples), "samples": out}
