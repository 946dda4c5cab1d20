"""SWE tasks in Docker (`cwm_rl/SWE-v0`, envs/swe_env.py): SWE-bench instances (`tasks`), task images
built offline (`images`), per-episode containers and the bash session (`containers`), the tools
(`tools`) and grading in a fresh container (`grading`, with the pure parts in rewards/swe.py)."""

from envs.swe.tasks import SHIPPED_TASKS, SWEInstance, load_instances, load_tasks

__all__ = ["SHIPPED_TASKS", "SWEInstance", "load_instances", "load_tasks"]
