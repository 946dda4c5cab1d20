"""`bench/SlowMath-v0`: the math env with a step that waits `step_delay_s` seconds (default 0.5),
standing in for an env whose steps run sandboxed tests. The wait is asynchronous (as an env
served over HTTP is to a worker), so it costs wall time, not CPU. Used by bench/async_vs_sync.py.
"""

import asyncio

import gymnasium

from envs.math_env import MathEnv


class SlowMathEnv(MathEnv):
    def __init__(self, step_delay_s: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.step_delay_s = step_delay_s

    async def astep(self, action: str):
        await asyncio.sleep(self.step_delay_s)
        return await super().astep(action)


if "bench/SlowMath-v0" not in gymnasium.registry:
    gymnasium.register(id="bench/SlowMath-v0", entry_point=SlowMathEnv)
