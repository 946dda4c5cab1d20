"""Task sources: tasks are drawn, never reset; held-out ids are disjoint from training ids for generators and
task lists alike and need no reference answer; draws resume from their cursor; the mix picks by weight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import gymnasium as gym
import pytest

from cwm_rl.config import EnvSpec
from cwm_rl.loop.tasks import TaskMix, TaskSource, draw_task, held_out_tasks, job_tasks, make_task_env
from cwm_rl.types import Task
from envs import SingleTurnEnv, make_env


class VerifierOnlyEnv(SingleTurnEnv):
    """A verifier and a generator, no reference answers, and a reset that must never be called by a task source."""

    resets = 0

    def sample_task(self, rng) -> Task:
        n = int(rng.integers(1000))
        return Task(id=f"parity-{n}", prompt=f"Is {n} even? Answer yes or no.", answer="yes" if n % 2 == 0 else "no")

    def reset(self, **kwargs):
        type(self).resets += 1
        return super().reset(**kwargs)

    def score(self, task, action):
        return float(action.strip() == task.answer), {}


if "cwm_rl_test/VerifierOnly-v0" not in gym.registry:
    gym.register(id="cwm_rl_test/VerifierOnly-v0", entry_point=VerifierOnlyEnv)


def test_task_source_skips_held_out_tasks_and_resumes_from_its_cursor():
    env = make_env("cwm_rl/Math-v0", difficulty=1)
    held_out = held_out_tasks(env, seed=0, num_tasks=10)
    held_ids = {t["id"] for t in held_out}
    assert len(held_ids) == len(held_out) == 10
    source = TaskSource(env, seed=0, held_out=held_ids)
    drawn = [source.next_task() for _ in range(200)]
    assert not {t["id"] for _, t in drawn} & held_ids
    assert len({seed for seed, _ in drawn}) == 200  # every draw a fresh seed
    resumed = TaskSource(make_env("cwm_rl/Math-v0", difficulty=1), seed=0, held_out=held_ids, cursor=source.cursor)
    assert [resumed.next_task() for _ in range(5)] == [source.next_task() for _ in range(5)]


def test_a_drawn_task_is_the_one_reset_with_that_seed_plays():
    for env_id, kwargs in [("cwm_rl/Math-v0", {"difficulty": 2}), ("cwm_rl/Code-v0", {}), ("cwm_rl/Trace-v0", {}),
                           ("cwm_rl/Echo-v0", {})]:
        env = make_env(env_id, **kwargs)
        for seed in (0, 7, 12345):
            task = draw_task(env, seed)
            env.reset(seed=seed)
            assert env.task == task, (env_id, seed)


def test_a_verifier_only_env_gets_a_held_out_split_without_a_single_reset():
    VerifierOnlyEnv.resets = 0
    spec = EnvSpec(id="cwm_rl_test/VerifierOnly-v0")
    mix = job_tasks([spec], seed=3, num_held_out=50, share=0.25, cursors={}, mix_seed=0)
    held_ids = {t["id"] for t in mix.held_out[spec.id]}
    assert len(held_ids) == 50
    trained = {t["id"] for _, t in mix.draw(2000, env_index=0)}
    assert not trained & held_ids and len(trained) > 800  # most of the other 950 tasks
    assert VerifierOnlyEnv.resets == 0
    mix.close()


def test_a_task_list_is_split_into_disjoint_held_out_and_training_tasks(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i} + 1 = ?", "answer": str(i + 1)}) + "\n" for i in range(12)))
    env = make_env("cwm_rl/Math-v0", tasks_path=str(path))
    held_out = held_out_tasks(env, seed=0, num_tasks=100, share=0.25)
    held_ids = {t["id"] for t in held_out}
    assert len(held_ids) == 3  # a quarter of 12, whatever was asked for
    assert held_ids == {t["id"] for t in held_out_tasks(make_env("cwm_rl/Math-v0", tasks_path=str(path)), seed=0, num_tasks=100)}
    source = TaskSource(env, seed=0, held_out=held_ids)
    first_epoch = [t["id"] for _, t in (source.next_task() for _ in range(9))]
    assert sorted(first_epoch) == sorted({f"q{i}" for i in range(12)} - held_ids)  # every training task once per epoch
    second_epoch = [t["id"] for _, t in (source.next_task() for _ in range(9))]
    assert sorted(second_epoch) == sorted(first_epoch) and second_epoch != first_epoch  # a fresh order
    other_seed = {t["id"] for t in held_out_tasks(env, seed=1, num_tasks=100)}
    assert len(other_seed) == 3 and other_seed != held_ids

    path.write_text(json.dumps({"id": "only", "question": "1 + 1 = ?", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="needs at least 2"):
        held_out_tasks(make_env("cwm_rl/Math-v0", tasks_path=str(path)), seed=0, num_tasks=10)


def test_trace_programs_are_held_out_whole_not_only_their_inputs(tmp_path):
    """Trace-v0's split key is the program: no call of a held-out program is trained on, from the generator or a file."""
    from cwm_rl.loop.tasks import split_key

    env = make_env("cwm_rl/Trace-v0", difficulty=1)
    held_out = held_out_tasks(env, seed=0, num_tasks=50)
    keys = {split_key(t) for t in held_out}
    assert len(keys) == len(held_out) == 50 and all(k.startswith("program-") for k in keys)
    source = TaskSource(env, seed=0, held_out=keys)
    drawn = [source.next_task()[1] for _ in range(3000)]
    assert not {split_key(t) for t in drawn} & keys
    # The generator reuses programs with other inputs (2,916 level-1 programs, 20 inputs each): the split must see it.
    programs = Counter(split_key(t) for t in drawn)
    assert max(programs.values()) > 1 and len({t["id"] for t in drawn}) > len(programs)

    # A task file: two calls of one program share its key, so both go to the same side.
    calls = [("def f(x):\n    return x + 1\n", [1]), ("def f(x):\n    return x + 1\n", [2])] + \
        [(f"def f(x):\n    return x * {k}\n", [k]) for k in range(2, 10)]
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps({"id": f"c{i}", "source": s, "function": "f", "args": a}) + "\n" for i, (s, a) in enumerate(calls)))
    listed = make_env("cwm_rl/Trace-v0", tasks_path=str(path))
    for seed in range(6):
        held = held_out_tasks(listed, seed=seed, num_tasks=2, share=0.25)
        held_keys = {split_key(t) for t in held}
        training = TaskSource(listed, seed=seed, held_out=held_keys).training
        assert len(held_keys) == 2 and not {split_key(t) for t in training} & held_keys
        assert len(training) + len(held) + (1 if split_key(listed.tasks[0]) in held_keys else 0) == len(calls)


def test_an_env_that_offers_no_tasks_is_named_in_the_error():
    class NoTasks(SingleTurnEnv):
        def score(self, task, action):
            return 0.0, {}

    with pytest.raises(ValueError, match="offers no tasks: implement sample_task"):
        held_out_tasks(NoTasks(), seed=0, num_tasks=5)


def test_an_old_style_sample_task_is_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"must take the random generator"):
        class OldStyle(SingleTurnEnv):  # noqa: F841
            def sample_task(self):
                return Task(id="t", prompt="p")


def test_drawing_swe_tasks_starts_no_container():
    """The SWE env's tasks and held-out split come from its task file; Docker is never asked (DOCKER_HOST points nowhere)."""
    code = ("from cwm_rl.config import EnvSpec; from cwm_rl.loop.tasks import job_tasks; import envs.swe.containers as c\n"
            "mix = job_tasks([EnvSpec(id='cwm_rl/SWE-v0')], seed=0, num_held_out=1, share=0.5, cursors={}, mix_seed=0)\n"
            "drawn = [t['id'] for _, t in mix.draw(4, 0)]\n"
            "held = [t['id'] for t in mix.held_out['cwm_rl/SWE-v0']]\n"
            "assert not set(drawn) & set(held) and not c._shared, (drawn, held)\n"
            "mix.close(); print(len(held), len(set(drawn)))")
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["1", "2"]  # 3 shipped tasks: 1 held out, the other 2 trained on


def test_task_mix_picks_envs_by_weight_and_keeps_a_cursor_per_env():
    specs = [EnvSpec(id="cwm_rl/Math-v0", kwargs={"difficulty": 1}, weight=3.0), EnvSpec(id="cwm_rl/Echo-v0", weight=1.0)]
    held_out = {s.id: held_out_tasks(make_task_env(s), seed=0, num_tasks=4) for s in specs}
    mix = TaskMix(specs, seed=0, held_out=held_out, cursors={}, mix_seed=1)
    picks = Counter(mix.pick_env() for _ in range(400))
    assert 0.65 < picks[0] / 400 < 0.85, picks  # weight 3 : 1
    drawn = mix.draw(3, env_index=1)
    assert len(drawn) == 3 and mix.cursors()["cwm_rl/Echo-v0"] >= 3 and mix.cursors()["cwm_rl/Math-v0"] == 0
    resumed = TaskMix(specs, seed=0, held_out=held_out, cursors=mix.cursors(), mix_seed=1)
    assert resumed.draw(2, env_index=1) == mix.draw(2, env_index=1)
    mix.close()
    resumed.close()


def test_a_resumed_mix_continues_from_its_cursors():
    specs = [EnvSpec(id="cwm_rl/Math-v0", kwargs={"difficulty": 2}), EnvSpec(id="cwm_rl/Echo-v0")]
    first = job_tasks(specs, seed=1, num_held_out=4, share=0.25, cursors={}, mix_seed=5)
    first.draw(7, 0), first.draw(3, 1)
    cursors = first.cursors()
    assert cursors == {"cwm_rl/Math-v0": 7, "cwm_rl/Echo-v0": 3}
    resumed = job_tasks(specs, seed=1, num_held_out=4, share=0.25, cursors={}, mix_seed=0)
    assert resumed.held_out_ids() == first.held_out_ids()  # the split is the same at every start
    resumed.continue_from(cursors, mix_seed=9)
    assert resumed.draw(5, 0) == first.draw(5, 0) and resumed.draw(2, 1) == first.draw(2, 1)
    first.close()
    resumed.close()
