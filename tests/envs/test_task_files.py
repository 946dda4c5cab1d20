"""Task files are read once per process while unchanged (workers make a fresh env per episode)."""

import json
import os

import pytest

from envs import make_env
from envs.tasks import read_task_file
from envs.tasks.math_tasks import load_math_tasks


def test_a_task_file_is_read_once_until_it_changes(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    calls = []

    def loader(p):
        calls.append(p)
        return load_math_tasks(p)

    first = read_task_file(path, loader, "math task")
    assert read_task_file(path, loader, "math task") is first and len(calls) == 1
    path.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n" + json.dumps({"question": "3+3?", "answer": "6"}) + "\n")
    os.utime(path, ns=(1, 1))  # a new mtime even on a coarse clock
    assert [t.answer for t in read_task_file(path, loader, "math task")] == ["4", "6"] and len(calls) == 2
    env_a, env_b = make_env("cwm_rl/Math-v0", tasks_path=str(path)), make_env("cwm_rl/Math-v0", tasks_path=str(path))
    assert env_a.tasks is env_b.tasks


def test_a_missing_task_file_names_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match="code task file .*nope.jsonl does not exist"):
        read_task_file(tmp_path / "nope.jsonl", load_math_tasks, "code task")
