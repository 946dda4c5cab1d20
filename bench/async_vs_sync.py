"""Benchmark async vs sync RL: trained tokens per second of the same job in both modes.

Two workloads, each run as a real `cwm-rl train` job (local Ray, one vLLM worker, the trainer)
in `mode: sync` and `mode: async`, same config otherwise:
(a) quickstart: the quickstart's env, 2-digit addition (`cwm_rl/Math-v0`, difficulty 2, operators "+"), single turn;
(b) env-latency-bound: `bench/SlowMath-v0` (bench/bench_envs/slow_math_env.py), the same env with every step waiting 0.5 s (as a
    sandboxed test run does), so generation is not the only thing to hide.
A fresh untrained `tiny` model, zero-advantage groups kept (so every step trains on the same
amount whatever the rewards). Rate = loss tokens of steps 2..N / wall time between step 1 and
step N (engine start, the first step and the evals excluded).

    .venv/bin/python bench/async_vs_sync.py [--steps 12]

Goal (issue 5): async >= 1.5x sync on (b). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(run_dir: Path, model: Path, mode: str, env: str, steps: int) -> float:
    settings = [
        f"run_dir={run_dir}", f"model.path={model}", f"mode={mode}", f"steps={steps}", "max_minutes=20",
        f"envs=[{{id: {env}, kwargs: {{difficulty: 2, operators: \"+\"}}}}]", "env_modules=[slow_math_env]",
        "rollout.group_size=8", "rollout.groups_per_request=4", "rollout.requests_in_flight=4", "buffer_groups=16",
        "rollout.sampling.max_tokens=16", "trainer.batch.step_tokens=512", "trainer.filters.drop_zero_advantage_groups=false",
        "trainer.filters.max_staleness=100", "eval.every_steps=0", "eval.num_tasks=8", "logging.tensorboard=false",
        "checkpoint_every=0",
    ]
    cli = Path(sys.executable).with_name("cwm-rl")
    args = [str(cli), "train", str(ROOT / "configs" / "quickstart.yaml")] + [a for s in settings for a in ("--set", s)]
    done = subprocess.run(args, cwd=ROOT / "bench" / "bench_envs", capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} job on {env} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    steps_logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [m for m in steps_logged if "loss" in m]
    first, rest = steps_logged[0], steps_logged[1:]
    return sum(m["loss_tokens"] for m in rest) / (rest[-1]["wall_s"] - first["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    from cwm_rl.models import init_model

    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = init_model(Path(tmp) / "tiny", preset="tiny", seed=0)
        for name, env in (("quickstart", "cwm_rl/Math-v0"), ("env_latency_bound", "bench/SlowMath-v0")):
            for mode in ("sync", "async"):
                figures[f"{name}_{mode}"] = run_job(Path(tmp) / f"{name}-{mode}", model, mode, env, args.steps)
                print(f"{name} {mode}: {figures[f'{name}_{mode}']:.0f} trained tokens/s", file=sys.stderr)
    print(json.dumps({
        "bench": "async_vs_sync",
        "steps": args.steps,
        **{f"{k}_trained_tokens_per_s": round(v, 1) for k, v in figures.items()},
        "quickstart_async_over_sync": round(figures["quickstart_async"] / figures["quickstart_sync"], 3),
        "env_latency_bound_async_over_sync": round(figures["env_latency_bound_async"] / figures["env_latency_bound_sync"], 3),
        "goal_env_latency_bound_ratio": 1.5,
    }))


if __name__ == "__main__":
    main()
