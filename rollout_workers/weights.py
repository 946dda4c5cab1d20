"""Weights that arrive through Ray's object store, written into a directory on the worker's own node.

With `publish.backend: object_store` the workers share no path with the trainer: the base model and
every published version come as a `ShippedWeights` (`cwm_rl/types.py`). `LocalWeights().materialise(
shipped)` fetches it (`ray.get`: Ray copies it from the node that holds it) and writes a complete HF
model directory that vLLM loads as it is (engine start, or `reload_weights` in flight); it returns that
directory. `tests/trainer/test_group.py` runs it against a real Ray, on weights a trainer actor published.

Why it is built this way:
- vLLM's engine runs in processes of its own and reloads from a path, so the bytes go to a file once;
  on /dev/shm (a RAM filesystem) that costs a memory copy, not a disk write.
- The config and tokenizer files are one object for every version: written once, hard-linked after.
- Only the newest `keep_last` versions stay. A worker killed with -9 cannot clean up, so a new one
  removes the directories of processes that are gone (the pid is in the name).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from cwm_rl.types import ShippedWeights

PREFIX = "cwm-rl-weights-"
WEIGHTS_FILE = "model.safetensors"


def _scratch_parent() -> Path:
    """/dev/shm when this machine has one (RAM: a write is a memory copy), else the temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class LocalWeights:
    """This worker's copies of shipped versions, under a directory of its own."""

    def __init__(self, keep_last: int = 2, parent: str | Path | None = None):
        parent = Path(parent) if parent is not None else _scratch_parent()
        _remove_orphans(parent)
        self.root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))
        self.keep_last = keep_last
        self._files: dict[str, Path] = {}  # files object id -> the dir its files were written into

    def materialise(self, shipped: ShippedWeights) -> Path:
        """Fetch `shipped` and write it as the model dir `root/v{version}`; returns the dir."""
        import ray

        files = self._files_dir(shipped.files)
        target = self.root / f"v{shipped.version:08d}"
        tmp = self.root / f".tmp-v{shipped.version}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for source in files.iterdir():
            if shipped.weights is None or source.name != WEIGHTS_FILE:
                os.link(source, tmp / source.name)
        if shipped.weights is not None:  # the parts of a safetensors file, each written straight from Ray's shared memory
            parts = ray.get(shipped.weights)
            with open(tmp / WEIGHTS_FILE, "wb") as f:
                f.write(parts["header"])
                for buffer in parts["buffers"]:
                    f.write(memoryview(buffer))
            del parts
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        self._prune()
        return target

    def _files_dir(self, ref) -> Path:
        import ray

        key = ref.hex()
        if key not in self._files:
            directory = self.root / f".files-{len(self._files)}"
            directory.mkdir()
            for name, data in ray.get(ref).items():
                (directory / Path(name).name).write_bytes(data)
            self._files[key] = directory
        return self._files[key]

    def _prune(self) -> None:
        versions = sorted(p for p in self.root.iterdir() if p.name.startswith("v"))
        for old in versions[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _remove_orphans(parent: Path) -> None:
    """Remove the weight dirs of worker processes that no longer exist (killed before they could clean up)."""
    for path in parent.glob(f"{PREFIX}*"):
        pid = path.name.removeprefix(PREFIX).split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)
