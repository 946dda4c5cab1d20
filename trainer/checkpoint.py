"""Training checkpoints: save everything a run needs to resume exactly, and load it back.

    >>> import tempfile
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    >>> root = tempfile.mkdtemp()
    >>> path = save_checkpoint(root, model=model, optimizer=opt, scheduler=sched, step=100, policy_version=100,
    ...                        data_cursor={"epoch": 0, "index": 3200})
    >>> path.name
    'step_00000100'
    >>> state = load_checkpoint(latest_checkpoint(root), model=model, optimizer=opt, scheduler=sched)
    >>> state["step"], state["policy_version"], state["data_cursor"]
    (100, 100, {'epoch': 0, 'index': 3200})

A checkpoint is `directory/step_{step:08d}/` holding:
    model.safetensors   the weights (DDP / torch.compile wrappers removed; tied weights once)
    optimizer.pt        optimizer.state_dict() (AdamW moments and `step` tensors, param groups)
    scheduler.pt        scheduler.state_dict()
    rng.pt              RNG states of python `random`, numpy, torch CPU and every CUDA device
    state.json          step, policy_version, data_cursor, extra, created_at (written last)

Resuming reproduces training bit for bit on the CPU: weights, optimizer state and RNG states are
restored exactly, and the data cursor tells the trainer where its data stream was. A checkpoint
is written into a `.tmp-*` dir, fsynced and renamed into place, so a crash mid-save never leaves
a half checkpoint under a `step_*` name. Only the newest `keep_last` are kept. One writer per
directory (trainer rank 0); every rank loads.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from trainer.publish import describe_mismatch, fsync_path, unwrap_model

STEP_DIR = re.compile(r"step_(\d{8,})")
TMP_PREFIX = ".tmp-"
MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, STATE_FILE = (
    "model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")


def save_checkpoint(directory: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any | None, step: int, policy_version: int, data_cursor: dict | int | None,
                    extra: dict | None = None, keep_last: int = 2, fsync: bool = True) -> Path:
    """Write `directory/step_{step:08d}` atomically and prune to the newest `keep_last`; returns its path.

    `data_cursor` and `extra` must be JSON-serialisable. A checkpoint of the same step is replaced.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: keep at least 1 checkpoint")
    state = {"step": step, "policy_version": policy_version, "data_cursor": data_cursor, "extra": extra,
             "created_at": time.time()}
    try:
        state_json = json.dumps(state, indent=2)
    except TypeError as e:
        raise ValueError(f"data_cursor and extra must be JSON-serialisable (dicts, lists, str, numbers): {e}") from e
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(TMP_PREFIX + "*"):  # from a save that crashed
        shutil.rmtree(leftover, ignore_errors=True)

    final = directory / f"step_{step:08d}"
    tmp = directory / f"{TMP_PREFIX}step_{step:08d}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_model(unwrap_model(model), str(tmp / MODEL_FILE))  # writes tied weights once
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        torch.save(_rng_states(), tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(state_json + "\n")
        if fsync:
            for path in [*tmp.iterdir(), tmp]:
                fsync_path(path)
        if final.exists():  # a re-save of the same step (e.g. after resuming from it): swap, then delete the old one
            replaced = directory / f"{TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
            os.rename(final, replaced)
            os.rename(tmp, final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        fsync_path(directory)
    for _, old in _step_dirs(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `directory`, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    complete = [path for _, path in _step_dirs(directory) if (path / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any | None) -> dict:
    """Restore weights, optimizer, scheduler and RNG states from a `step_*` dir; returns its state.json.

    The model is checked against the checkpoint (names and shapes) before anything is changed.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        hint = f"; it holds checkpoints, pick one with latest_checkpoint({str(path)!r})" if _step_dirs(path) else ""
        raise ValueError(f"{path} is not a checkpoint (no {STATE_FILE}){hint}")
    def torch_file(file: Path) -> Any:
        return torch.load(file, weights_only=True)

    # Every file is read before anything is restored: a damaged one changes nothing and is named.
    state = _read(path, STATE_FILE, lambda file: json.loads(file.read_text()))
    weights = _read(path, MODEL_FILE, load_file)
    stateful = [(obj, file, what) for obj, file, what in ((optimizer, OPTIMIZER_FILE, "optimizer"),
                                                          (scheduler, SCHEDULER_FILE, "scheduler")) if obj is not None]
    saved = {}
    for _, file, what in stateful:
        if not (path / file).is_file():
            raise ValueError(f"checkpoint {path} has no {what} state ({file}); pass {what}=None to skip it")
        saved[what] = _read(path, file, torch_file)
    rng_states = _read(path, RNG_FILE, torch_file)
    model = unwrap_model(model)
    _check_model_matches(model, weights, path)
    model.load_state_dict(weights, strict=False)  # strict=False: tied aliases are absent from the file
    for obj, _, what in stateful:
        try:
            obj.load_state_dict(saved[what])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"cannot load the {what} state of checkpoint {path}: {e}. Build the {what} the same way "
                             "as the run that saved it (same parameters and parameter groups)") from e
    _set_rng_states(rng_states)
    return state


# What reading a file cut short or corrupted raises: safetensors' header check, torch's zip reader (RuntimeError) or
# its unpickler running out of input (EOFError), a JSON or UTF-8 decode error (ValueError), an OSError (a missing file,
# EIO, torch seeking past a file cut short: EINVAL) other than permissions.
_DAMAGED = (SafetensorError, RuntimeError, EOFError, ValueError, OSError)


def _read(checkpoint: Path, file: str, reader: Any) -> Any:
    """`reader(checkpoint / file)`; a ValueError naming the file, and the checkpoint to fall back on, if it is missing or
    damaged (a disk error, a copy cut short: a save itself is atomic)."""
    try:
        if not (checkpoint / file).is_file():
            raise FileNotFoundError("missing")
        return reader(checkpoint / file)
    except PermissionError:
        raise  # not the file's content: its own message says what to fix
    except _DAMAGED as e:
        step = int(m.group(1)) if (m := STEP_DIR.fullmatch(checkpoint.name)) else None
        older = [p for n, p in _step_dirs(checkpoint.parent) if step is not None and n < step and (p / STATE_FILE).is_file()]
        fallback = (f"move it aside ({checkpoint} -> {checkpoint.parent / ('damaged-' + checkpoint.name)}) and resume again: the "
                    f"one before it, {older[-1].name}, is used" if older else "there is no other checkpoint to fall back on")
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"checkpoint {checkpoint} cannot be restored: {file} cannot be read ({type(e).__name__}: {first_line}); "
                         f"{fallback}") from e


def _check_model_matches(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """ValueError naming every missing, unexpected or reshaped tensor between `model` and the checkpoint."""
    current = model.state_dict()
    saved_ptrs = {current[name].data_ptr() for name in weights if name in current}
    # A tied alias (e.g. lm_head.weight = embed_tokens.weight) is written once: its twin fills it.
    expected = {name: t.shape for name, t in current.items() if name in weights or t.data_ptr() not in saved_ptrs}
    mismatch = describe_mismatch({name: t.shape for name, t in weights.items()}, expected, "checkpoint", "model")
    if mismatch:
        raise ValueError(f"checkpoint {path} does not fit the model being restored: {mismatch}. "
                         "Build the model with the configuration of the run that saved it")


def _rng_states() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {"key": numpy_state["state"]["key"].tolist(), "pos": numpy_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state({**numpy_state, "state": {"key": np.array(numpy_state["state"]["key"], dtype=np.uint32),
                                                  "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """Checkpoint dirs under `directory`, oldest step first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)

