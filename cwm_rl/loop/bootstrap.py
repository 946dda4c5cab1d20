"""The policy a job starts from: `model.path` as it is, or a tiny model made here and warm-started by SFT.

`bootstrap_model(config, run_dir, say)` returns the model directory: `model.path`, or
`run_dir/model/init` made by `cwm_rl.models.init_model`, then `run_dir/model/sft` after the warm
start (`model.sft`, run by `cwm_rl.sft.run_sft`). Both stages are skipped when their output is already in the run dir, so a resumed run (or one
that crashed during the warm start) reuses them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cwm_rl.config import JobConfig


def bootstrap_model(config: JobConfig, run_dir: Path, say: Callable[[str], None],
                    check: Callable[[Path], None] = lambda model_dir: None) -> Path:
    """The model directory the job trains: model.path, or run_dir/model/{init,sft}. `check(model_dir)` runs on
    the model before any warm start (the engine preflight: a config it refuses fails before minutes of SFT)."""
    c = config.model
    if c.path is not None:
        if not (Path(c.path) / "config.json").is_file():
            raise FileNotFoundError(f"model.path {c.path} is not a Hugging Face model directory (no config.json)")
        check(Path(c.path))
        return Path(c.path)
    from cwm_rl.models import init_model

    init_dir = run_dir / "model" / "init"
    if not (init_dir / "config.json").is_file():
        init_model(init_dir, preset=c.init_preset, arch=c.init_arch, seed=c.init_seed, tokenizer=c.init_tokenizer, force=True)
    check(init_dir)  # the warm start keeps the architecture: what the engine takes is known now
    if c.sft.steps == 0:
        return init_dir
    sft_dir = run_dir / "model" / "sft"
    if not (sft_dir / "sft_summary.json").is_file():
        from cwm_rl.sft import run_sft

        sft = c.sft.resolve(config.envs, config.seed)
        names = [f"{e.id} (weight {e.weight:g})" for e in sft.mix] or [sft.env_id]
        say(f"warm start: SFT {sft.steps} steps on {', '.join(names)} ...")
        summary = run_sft(init_dir, sft_dir, sft, force=True, progress=lambda e: _say_eval(e, say) if e["event"] == "eval" else None)
        by_env = "" if len(summary["by_env"]) == 1 else " (" + ", ".join(
            f"{k} {v['accuracy_before']:.1%} -> {v['accuracy_after']:.1%}" for k, v in summary["by_env"].items()) + ")"
        say(f"warm start: held-out accuracy {summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%}{by_env} "
            f"after {summary['steps']} steps")
    return sft_dir


def _say_eval(event: dict, say: Callable[[str], None]) -> None:
    """A warm-start eval as one line: the steps pass quietly, the accuracy (per env) does not."""
    by_env = event["by_env"]
    detail = "" if len(by_env) == 1 else " (" + ", ".join(f"{k} {v:.1%}" for k, v in by_env.items()) + ")"
    say(f"warm start: step {event['step']}/{event['steps']}: held-out accuracy {event['accuracy']:.1%}{detail}")
