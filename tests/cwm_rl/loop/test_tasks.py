"""Task sources: training draws skip held-out tasks, resume from their cursor, and the mix picks by weight."""

from __future__ import annotations

from collections import Counter

from cwm_rl.config import EnvSpec
from cwm_rl.loop.tasks import TaskMix, TaskSource, held_out_tasks


def test_task_source_skips_held_out_tasks_and_resumes_from_its_cursor():
    spec = EnvSpec(id="cwm_rl/Math-v0", kwargs={"difficulty": 1})
    held_out = held_out_tasks(spec, seed=0, num_tasks=10)
    held_ids = {t["id"] for t in held_out}
    assert len(held_ids) == len(held_out) >= 5
    source = TaskSource(spec, seed=0, held_out_ids=held_ids)
    drawn = [source.next_task() for _ in range(200)]
    assert not {t["id"] for _, t in drawn} & held_ids
    assert len({seed for seed, _ in drawn}) == 200  # every draw a fresh seed
    resumed = TaskSource(spec, seed=0, held_out_ids=held_ids, cursor=source.cursor)
    assert [resumed.next_task() for _ in range(5)] == [source.next_task() for _ in range(5)]


def test_task_mix_picks_envs_by_weight_and_keeps_a_cursor_per_env():
    specs = [EnvSpec(id="cwm_rl/Math-v0", kwargs={"difficulty": 1}, weight=3.0), EnvSpec(id="cwm_rl/Echo-v0", weight=1.0)]
    held_out = {s.id: held_out_tasks(s, seed=0, num_tasks=4) for s in specs}
    mix = TaskMix(specs, seed=0, held_out=held_out, cursors={}, mix_seed=1)
    picks = Counter(mix.pick_env() for _ in range(400))
    assert 0.65 < picks[0] / 400 < 0.85, picks  # weight 3 : 1
    drawn = mix.draw(3, env_index=1)
    assert len(drawn) == 3 and mix.cursors()["cwm_rl/Echo-v0"] >= 3 and mix.cursors()["cwm_rl/Math-v0"] == 0
    resumed = TaskMix(specs, seed=0, held_out=held_out, cursors=mix.cursors(), mix_seed=1)
    assert resumed.draw(2, env_index=1) == mix.draw(2, env_index=1)
    mix.close()
    resumed.close()
