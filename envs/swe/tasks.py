"""SWE tasks in SWE-bench form, and the three small repositories shipped with cwm-rl (`data/`).

A line of a tasks file is a SWE-bench instance: `instance_id`, `repo`, `base_commit`,
`problem_statement`, `patch` (the gold fix), `test_patch` (the hidden tests), `FAIL_TO_PASS`
and `PASS_TO_PASS` (pytest node ids, as JSON lists or as the JSON-encoded strings SWE-bench
ships), plus optional fields:

- `image`: a prebuilt image holding the repository at `base_commit` in `workdir` (the official
  SWE-bench / SWE-Gym images); used as it is, no build.
- `repo_dir`: a local snapshot to build the task image from, offline (relative to the tasks
  file): a git repository holding `base_commit`, or a folder of plain files whose base commit is
  made with fixed metadata (so its sha is known in advance: `data/make_tasks.py`).
- `test_cmd`: the command that runs the hidden tests; without it cwm-rl runs pytest on the
  files the tests live in and reads each test's outcome from a reporting plugin.
- `workdir`: where the repository is in the container (default /testbed, as in SWE-bench).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cwm_rl.types import Task

DATA_DIR = Path(__file__).parent / "data"
SHIPPED_TASKS = DATA_DIR / "tasks.jsonl"
WORKDIR = "/testbed"


class SWEInstance(BaseModel):
    """One SWE-bench-style task (see the module docstring)."""

    model_config = ConfigDict(extra="ignore")  # SWE-bench rows carry more fields (version, hints_text, ...)

    instance_id: str = Field(min_length=1)
    repo: str = ""
    base_commit: str = Field(min_length=4)
    problem_statement: str = Field(min_length=1)
    patch: str = ""
    test_patch: str = Field(min_length=1)
    FAIL_TO_PASS: list[str] = Field(min_length=1)
    PASS_TO_PASS: list[str] = Field(default_factory=list)
    image: str | None = None
    repo_dir: str | None = None
    test_cmd: str | None = None
    workdir: str = WORKDIR

    @field_validator("FAIL_TO_PASS", "PASS_TO_PASS", mode="before")
    @classmethod
    def _json_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # SWE-bench stores these lists JSON-encoded
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(f"expected a list of test ids or its JSON string, got {value[:80]!r}") from None
        return value

    def source_dir(self, base: Path | None = None) -> Path | None:
        """`repo_dir` resolved against the tasks file's folder."""
        if self.repo_dir is None:
            return None
        path = Path(self.repo_dir)
        return path if path.is_absolute() or base is None else base / path

    def to_task(self, base: Path | None = None) -> Task:
        """The env-facing Task: the problem statement as prompt, the instance in metadata."""
        meta = self.model_dump(mode="json")
        if self.repo_dir is not None:
            meta["repo_dir"] = str(self.source_dir(base).resolve())
        return Task(id=self.instance_id, prompt=self.problem_statement, answer=self.patch or None, metadata={"swe": meta})

    @classmethod
    def from_task(cls, task: Task) -> SWEInstance:
        if "swe" not in task.metadata:
            raise ValueError(f"task {task.id!r} is not a SWE task (no metadata['swe']); load tasks with envs.swe.load_instances")
        return cls.model_validate(task.metadata["swe"])


def load_instances(path: str | Path = SHIPPED_TASKS) -> list[SWEInstance]:
    """Read a JSONL of SWE-bench instances; a bad line is an error naming the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SWE tasks file {path} does not exist")
    instances, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            instance = SWEInstance.model_validate_json(line)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'line'}: {err['msg']}" for err in e.errors()[:5])
            raise ValueError(f"{path}:{number}: not a SWE instance ({problems})") from None
        if instance.instance_id in seen:
            raise ValueError(f"{path}:{number}: instance_id {instance.instance_id!r} appears twice")
        if instance.image is None and instance.repo_dir is None:
            raise ValueError(f"{path}:{number}: instance {instance.instance_id!r} has neither `image` (a prebuilt image) nor "
                             "`repo_dir` (a local snapshot to build one from offline); add one of them")
        if instance.repo_dir is not None and not instance.source_dir(path.parent).is_dir():
            raise ValueError(f"{path}:{number}: repo_dir {instance.source_dir(path.parent)} is not a folder")
        seen.add(instance.instance_id)
        instances.append(instance)
    if not instances:
        raise ValueError(f"{path} holds no SWE instances")
    return instances


def load_tasks(path: str | Path = SHIPPED_TASKS) -> list[Task]:
    path = Path(path)
    return [instance.to_task(path.parent) for instance in load_instances(path)]
