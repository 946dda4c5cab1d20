"""The runs a viewer shows: one run directory, or every run directory below a parent directory.

A run directory is one a training job writes to: `rollouts.sqlite` (the rollout store), and as the
job goes `metrics.jsonl` (one JSON object of scalars per trainer step or eval, with its `step`),
`summary.json` (at the end), `config.yaml`, and `analysis.sqlite` once something was replayed,
rescored or branched. The viewer reads these files and writes none (SQLite may add its -wal/-shm side
files beside a store no job has open).
`Runs("runs/demo")` is one run (named "demo") when that directory holds rollouts.sqlite; `Runs("runs")`
is every subdirectory holding one, and new ones appear while it is open (tests/cwm_rl/viewer/test_app.py).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cwm_rl.store import STORE_FILE, RolloutStore
from cwm_rl.viewer.tokens import TokenText

METRICS_FILE = "metrics.jsonl"
MAX_METRICS_BYTES = 8 << 20  # per poll; a longer file arrives over several polls


class RunNotFoundError(LookupError):
    """No run of that name under the viewer's directory."""


@dataclass
class Run:
    name: str
    dir: Path
    tokens: TokenText = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = TokenText(self.dir)

    @property
    def store(self) -> Path:
        return self.dir / STORE_FILE


class Runs:
    """The run(s) under `root`, checked at start: a clear error when there is nothing to show or a store is unreadable."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory; pass a run directory (the one `cwm-rl train` writes to) "
                                    "or a directory of run directories")
        self.single = (self.root / STORE_FILE).exists()
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        if self.single:
            RolloutStore(self.root, readonly=True).close()  # RolloutStoreError: newer schema, not a store
        self.all()
        if not self._runs:
            raise FileNotFoundError(f"no {STORE_FILE} in {root} nor in its subdirectories; pass the run directory of a "
                                    "training job (or a directory of them)")

    def all(self) -> list[Run]:
        """Every run, newest store first (the directory is listed again on each call: runs started later appear)."""
        with self._lock:
            if self.single:
                found = {self.root.name or "run": self.root}
            else:
                dirs = [d for d in self.root.iterdir() if (d / STORE_FILE).exists()]
                found = {d.name: d for d in sorted(dirs, key=lambda d: (d / STORE_FILE).stat().st_mtime, reverse=True)}
            self._runs = {name: self._runs.get(name) or Run(name, path) for name, path in found.items()}
            return list(self._runs.values())

    def get(self, name: str) -> Run:
        run = self._runs.get(name)
        if run is None:
            run = next((r for r in self.all() if r.name == name), None)
        if run is None:
            known = ", ".join(self._runs) or "none"
            raise RunNotFoundError(f"no run named {name!r} in {self.root} (runs: {known})")
        return run


def read_metrics(run: Run, offset: int = 0) -> dict[str, Any]:
    """The complete lines of metrics.jsonl from byte `offset` on: `{"offset": where to go on, "rows": [...],
    "reset": True when the file is shorter than `offset` (a new run in the same directory: start over)}`."""
    path = run.dir / METRICS_FILE
    if not path.exists():
        return {"offset": 0, "rows": [], "reset": offset > 0}
    reset = offset > path.stat().st_size
    start = 0 if reset else offset
    with path.open("rb") as f:
        f.seek(start)
        data = f.read(MAX_METRICS_BYTES)
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn or foreign line: skip it rather than lose the curve
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return {"offset": start + end, "rows": rows, "reset": reset}


def run_info(run: Run) -> dict[str, Any]:
    """What the run page's header shows: a few config fields, summary.json, whether analysis results exist."""
    info: dict[str, Any] = {"name": run.name, "dir": str(run.dir), "config": None, "summary": None,
                            "has_analysis": (run.dir / "analysis.sqlite").exists(), "tokenizer": run.tokens.describe()}
    config_path = run.dir / "config.yaml"
    if config_path.exists():
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as e:
            config = {"error": f"config.yaml is not YAML: {e}"}
        if isinstance(config, dict):
            model = config.get("model") if isinstance(config.get("model"), dict) else {}
            envs = config.get("envs") if isinstance(config.get("envs"), list) else []
            info["config"] = {"mode": config.get("mode"), "steps": config.get("steps"), "model": model.get("path"),
                              "envs": [e.get("id") for e in envs if isinstance(e, dict)], "error": config.get("error")}
    summary_path = run.dir / "summary.json"
    if summary_path.exists():
        try:
            info["summary"] = json.loads(summary_path.read_text())
        except ValueError:
            info["summary"] = None  # being written: the next poll reads it
    return info
