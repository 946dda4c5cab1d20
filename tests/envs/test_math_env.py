import json
import re
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from envs import make_env
from envs.tasks.math_tasks import DIFFICULTY_LEVELS, arithmetic_task, load_math_tasks


@pytest.mark.parametrize("level", sorted(DIFFICULTY_LEVELS))
def test_generated_answers_are_right(level):
    rng = np.random.default_rng(level)
    for _ in range(50):
        task = arithmetic_task(rng, level)
        expr = task.prompt.removeprefix("What is ").removesuffix("?")
        # Evaluate independently with exact fractions (operands are small ints or p/q literals).
        value = eval(re.sub(r"(\d+)/(\d+)", r"Fraction(\1, \2)", expr), {"Fraction": Fraction})
        assert Fraction(task.answer) == Fraction(value), task


@pytest.mark.parametrize(("level", "operators"), [(2, "+"), (2, "-"), (3, "*"), (4, "-"), (4, "+*"), (5, "/")])
def test_operators_keep_only_those_operators(level, operators):
    rng = np.random.default_rng(0)
    for _ in range(40):
        task = arithmetic_task(rng, level, operators)
        expr = task.prompt.removeprefix("What is ").removesuffix("?")
        used = set(re.sub(r"(\d+)/(\d+)", "F", expr).replace("(", "").replace(")", "")) & set("+-*/")
        assert used and used <= set(operators), task.prompt
        value = eval(re.sub(r"(\d+)/(\d+)", r"Fraction(\1, \2)", expr), {"Fraction": Fraction})
        assert Fraction(task.answer) == Fraction(value), task


def test_default_operators_draw_the_same_tasks_as_naming_them_all():
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    for level in sorted(DIFFICULTY_LEVELS):
        assert [arithmetic_task(a, level).id for _ in range(20)] == [arithmetic_task(b, level, "/*-+"[::-1]).id for _ in range(20)]


@pytest.mark.parametrize(("level", "operators"), [(1, "-"), (2, "*"), (2, ""), (4, "*")])
def test_operators_a_level_cannot_use_are_refused(level, operators):
    with pytest.raises(ValueError, match="operators|needs"):
        make_env("cwm_rl/Math-v0", difficulty=level, operators=operators)


def test_rewards_and_reasons():
    env = make_env("cwm_rl/Math-v0", difficulty=2)
    obs, info = env.reset(seed=4)
    assert obs[0]["role"] == "system" and "\\boxed{}" in obs[0]["content"]
    gold = env.task.answer
    assert env.step(f"So the result is \\boxed{{{gold}}}.")[1:3] == (1.0, True)
    env.reset(seed=4)
    _, reward, _, _, info = env.step("\\boxed{-99999}")
    assert reward == -1.0 and info["verdict"] == "wrong" and info["gold"] == gold
    env.reset(seed=4)
    _, reward, _, _, info = env.step(f"\\boxed{{{gold}}} \\boxed{{{gold}}}")
    assert reward == -1.0 and info["verdict"] == "format_error" and "2" in info["reason"]
    env.reset(seed=4)
    _, reward, _, _, info = env.step(str(gold))
    assert reward == -1.0 and info["verdict"] == "format_error"


@pytest.mark.parametrize("answer, on_loop", [("\\boxed{GOLD}", True), ("\\boxed{-99999}", True), ("no box", True),
                                             ("\\boxed{GOLD.0}", False), ("\\boxed{\\frac{GOLD}{1}}", False)])
async def test_astep_grades_as_step_does_on_the_loop_only_without_math_verify(monkeypatch, answer, on_loop):
    # Plain integers and format errors are graded on the event loop, the rest in a thread: the results are the same.
    import asyncio

    threaded = []
    to_thread = asyncio.to_thread
    monkeypatch.setattr(asyncio, "to_thread", lambda fn, *a, **k: threaded.append(fn.__name__) or to_thread(fn, *a, **k))
    sync_env, async_env = make_env("cwm_rl/Math-v0", difficulty=2), make_env("cwm_rl/Math-v0", difficulty=2)
    sync_env.reset(seed=7)
    await async_env.areset(seed=7)
    action = answer.replace("GOLD", str(sync_env.task.answer))
    expected = sync_env.step(action)
    assert await async_env.astep(action) == expected
    assert threaded == ([] if on_loop else ["step"])
    assert async_env.done and async_env.transcript == sync_env.transcript
    with pytest.raises(RuntimeError, match="episode is over"):
        await async_env.astep(action)


async def test_a_subclass_is_reset_and_stepped_in_a_thread(monkeypatch):
    # Its own score (or reset, or step) may be slow: only MathEnv's own code runs on the event loop.
    import asyncio

    from envs.math_env import MathEnv

    class Lenient(MathEnv):
        def score(self, task, action):
            return 1.0, {}

    threaded = []
    to_thread = asyncio.to_thread
    monkeypatch.setattr(asyncio, "to_thread", lambda fn, *a, **k: threaded.append(fn.__name__) or to_thread(fn, *a, **k))
    env = Lenient(difficulty=2)
    await env.areset(seed=7)
    assert (await env.astep(f"\\boxed{{{env.task.answer}}}"))[1] == 1.0
    assert threaded == ["reset", "step"]


def test_one_zero_rewards_and_think_format():
    env = make_env("cwm_rl/Math-v0", think=True, wrong_reward=0.0)
    env.reset(seed=0)
    gold = env.task.answer
    assert "<think>" in env.state()["transcript"][0]["content"]
    assert env.step(f"<think>add them</think> \\boxed{{{gold}}}")[1] == 1.0
    for bad in (f"\\boxed{{{gold}}}", f"<think>\\boxed{{{gold}}}</think>", f"<think>a</think></think>\\boxed{{{gold}}}"):
        env.reset(seed=0)
        _, reward, _, _, info = env.step(bad)
        assert reward == 0.0 and info["verdict"] == "format_error", bad
    assert env.reference_action() is not None


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="difficulty must be one of"):
        make_env("cwm_rl/Math-v0", difficulty=9)
    with pytest.raises(ValueError, match="must exceed"):
        make_env("cwm_rl/Math-v0", correct_reward=0.0, wrong_reward=0.0)


GSM8K = [
    {"question": "Tom has 3 apples and buys 1,200 more. How many?", "answer": "3 + 1200 = 1203\n#### 1,203"},
    {"question": "Half of 9?", "answer": "9 / 2 = 4.5\n#### 4.5"},
]


def test_gsm8k_jsonl_and_plain_parquet(tmp_path):
    jsonl = tmp_path / "gsm8k.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in GSM8K) + "\n")
    tasks = load_math_tasks(jsonl)
    assert [t.answer for t in tasks] == ["1203", "4.5"]
    assert tasks[0].metadata["solution"] == "3 + 1200 = 1203" and tasks[0].id == "gsm8k-0"

    parquet = tmp_path / "plain.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "p1", "question": "1/2 + 1/4?", "answer": "3/4"}]), parquet)
    env = make_env("cwm_rl/Math-v0", tasks_path=str(parquet))
    obs, info = env.reset(seed=0)
    assert info["task_id"] == "p1" and obs[-1]["content"] == "1/2 + 1/4?"
    assert env.step("\\boxed{\\frac{3}{4}}")[1] == 1.0

    env = make_env("cwm_rl/Math-v0", tasks_path=str(jsonl))
    seen = {env.reset(seed=s)[1]["task_id"] for s in range(20)}
    assert seen == {"gsm8k-0", "gsm8k-1"}


def test_bad_task_files(tmp_path):
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="record 0 has \\['question'\\]; every record needs 'question' and 'answer'"):
        load_math_tasks(missing)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl:2 is not valid JSON"):
        load_math_tasks(broken)
    with pytest.raises(ValueError, match="unsupported task file type '.csv'"):
        (tmp_path / "t.csv").write_text("q,a")
        load_math_tasks(tmp_path / "t.csv")
    with pytest.raises(FileNotFoundError):
        load_math_tasks(tmp_path / "nope.jsonl")
