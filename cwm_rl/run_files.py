"""What a run directory holds, found from the files a job leaves: its config, its model, its published versions.

    RUN_DIR/config.yaml            the job's config as it ran (model.path, envs, limits, sampling)
    RUN_DIR/model/{init,sft}       the model the job made and warm-started, when model.path was not set
    RUN_DIR/weights/v00000012      published policy version 12 (a complete Hugging Face checkpoint)
    RUN_DIR/rollouts.sqlite        the rollout store; RUN_DIR/analysis.sqlite: replay, rescore and branch results

The rollout tools (`cwm-rl rollouts show --tokens`, `branch`) and the viewer use these to find the
tokenizer and the weights of a run without being told. Imports no ML stack until a tokenizer is loaded.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml


def run_root(path: str | os.PathLike[str]) -> Path:
    """The run directory of `path` (a run directory, or its rollouts.sqlite)."""
    path = Path(path)
    return path.parent if path.suffix == ".sqlite" else path


def read_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """RUN_DIR/config.yaml as a dict, or None when the run has none (a store written outside a job) or it is unreadable."""
    path = run_root(run_dir) / "config.yaml"
    try:
        loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def find_model_dir(run_dir: str | os.PathLike[str]) -> Path | None:
    """The model the run started from (`find_start_model`), else its newest published version; None when
    the run has neither on disk."""
    versions = published_versions(run_dir)
    return find_start_model(run_dir) or (versions[max(versions)] if versions else None)


def published_versions(run_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """Policy version -> its published checkpoint directory (only those still on disk: a job keeps the last few)."""
    weights = run_root(run_dir) / "weights"
    out = {}
    for d in weights.glob("v*") if weights.is_dir() else ():
        if d.name[1:].isdigit() and (d / "config.json").is_file():
            out[int(d.name[1:])] = d
    return dict(sorted(out.items()))


def resolve_model(run_dir: str | os.PathLike[str], model: str) -> tuple[Path, int | None]:
    """`--model VERSION|DIR`: a policy version of the run (a number; 0 = the model it started from) or a model
    directory. Returns (directory, policy version or None). A clear error when neither is found."""
    if model.isdigit():
        version = int(model)
        versions = published_versions(run_dir)
        if version in versions:
            return versions[version], version
        if version == 0 and (start := find_start_model(run_dir)) is not None:
            return start, 0
        kept = ", ".join(map(str, versions)) or "none"
        raise FileNotFoundError(f"policy version {version} is not on disk in {run_root(run_dir) / 'weights'} (kept: {kept}; "
                                "a job keeps publish.keep_last versions); pass a kept version or a model directory")
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: not a policy version of the run and not a model directory (no config.json)")
    return path, None


def find_start_model(run_dir: str | os.PathLike[str]) -> Path | None:
    """The model the run started from (version 0), without falling back to published versions: a directory
    with a model's config.json, or at least its tokenizer."""
    root = run_root(run_dir)
    model = (read_run_config(root) or {}).get("model")
    named = model.get("path") if isinstance(model, dict) else None
    candidates = []
    if named:  # absolute, or relative to the run directory, or to where the job was started
        path = Path(named).expanduser()
        candidates += [path] if path.is_absolute() else [root / path, path]
    for c in candidates + [root / "model" / "sft", root / "model" / "init"]:
        if (c / "config.json").is_file() or (c / "tokenizer_config.json").is_file():
            return c
    return None


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_tokenizer(run_dir: str | os.PathLike[str]) -> Any | None:
    """The run's tokenizer (transformers), or None when the run has no model on disk, transformers is not
    installed (the base install, e.g. an env server) or cannot load it: tools then show token ids only."""
    model_dir = find_model_dir(run_dir)
    if model_dir is None:
        return None
    try:
        return _tokenizer(str(model_dir))
    except Exception:  # transformers missing, or a directory it cannot read: token ids are still worth showing
        return None
