"""Task sources for the built-in envs: generators and file loaders."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from cwm_rl.types import Task


def read_task_file(path: str | Path, loader: Callable[[str], list[Task]], what: str = "task") -> tuple[Task, ...]:
    """A task file's tasks, read once per process while the file is unchanged: workers make a fresh env
    for every episode, and re-reading an 8,000-line file each time slowed rollouts ten-fold."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    stat = path.stat()
    return _read(loader, str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read(loader: Callable[[str], list[Task]], path: str, mtime_ns: int, size: int) -> tuple[Task, ...]:
    return tuple(loader(path))
