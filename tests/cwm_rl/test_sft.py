"""SFT warm start with real components: the tiny model, the math env, the trainer, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
from typer.testing import CliRunner

from cwm_rl.sft import (
    SampleMaker,
    SFTConfig,
    draw,
    generate_greedy,
    held_out_examples,
    run_sft,
    score_completions,
    train_seed,
    training_examples,
)
from cwm_rl.types import Task
from envs import SingleTurnEnv, make_env

MATH = "cwm_rl/Math-v0"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two threads wait on each other (3-10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_a_sample_learns_exactly_the_answer_and_the_end_of_turn(tokenizer):
    env = make_env(MATH, difficulty=2)
    maker = SampleMaker(tokenizer)
    example = draw(env, train_seed(0, 3))
    sample = maker(example)
    assert len(sample.token_ids) == len(sample.loss_mask) == len(sample.behaviour_logprobs)
    n_prompt = sample.loss_mask.index(1)
    assert sample.loss_mask == [0] * n_prompt + [1] * (len(sample.token_ids) - n_prompt)
    assert sample.token_ids[:n_prompt] == maker.prompt_ids(example.messages)
    learned = sample.token_ids[n_prompt:]
    assert learned[-1:] == maker.end_of_turn_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert tokenizer.decode(learned[:-1]) == example.answer == f"The answer is \\boxed{{{example.task.answer}}}."
    # The prompt is what a rollout worker renders: it ends with the generation prompt.
    assert tokenizer.decode(sample.token_ids[:n_prompt]).endswith(f"{example.task.prompt}<|im_end|>\n<|im_start|>assistant\n")


def test_held_out_tasks_are_distinct_and_never_trained_on():
    env = make_env(MATH, difficulty=1)  # 100 tasks in all: the held-out set is capped at a quarter
    held_out, info = held_out_examples(env, SFTConfig(env_id=MATH, steps=1, eval_tasks=200))
    ids = [e.task_id for e in held_out]
    assert len(ids) == len(set(ids)) == info["held_out"] == 25  # a quarter of the 100 tasks
    stream = training_examples(env, SFTConfig(env_id=MATH, steps=1), set(ids))
    trained = {next(stream).task_id for _ in range(2_000)}
    assert trained and not trained & set(ids)
    assert len(trained) == 75  # every other task is trained on

    big = make_env(MATH, difficulty=2)  # thousands of tasks: the requested count is used
    held_out, info = held_out_examples(big, SFTConfig(env_id=MATH, steps=1, eval_tasks=40))
    assert len({e.task_id for e in held_out}) == 40 == info["held_out"]


def test_too_large_a_held_out_share_is_refused():
    env = make_env(MATH, difficulty=1)
    with pytest.raises(ValueError, match="held-out set covers"):
        next(training_examples(env, SFTConfig(env_id=MATH, steps=1), {f"arith-L1-{a}+{b}" for a in range(10) for b in range(10)}))


def test_scoring_counts_right_answers_and_only_those():
    env = make_env(MATH, difficulty=1)
    examples = [draw(env, train_seed(0, k)) for k in range(4)]
    right = [f"The answer is \\boxed{{{e.task.answer}}}." for e in examples]
    wrong = [f"The answer is \\boxed{{{int(e.task.answer) + 1}}}." for e in examples]
    unboxed = [str(e.task.answer) for e in examples]
    assert score_completions(env, examples, right).accuracy == 1.0
    assert score_completions(env, examples, wrong).num_correct == 0
    assert score_completions(env, examples, unboxed).num_correct == 0
    mixed = score_completions(env, examples, right[:1] + wrong[1:])
    assert (mixed.num_correct, mixed.num_tasks, mixed.accuracy) == (1, 4, 0.25)


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(tiny_model, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    env = make_env(MATH, difficulty=3)  # prompts of different lengths
    maker = SampleMaker(tokenizer)
    prompts = [maker.prompt_ids(draw(env, train_seed(0, k)).messages) for k in range(6)]
    assert len({len(p) for p in prompts}) > 1
    eot = maker.end_of_turn_ids[0]
    batched = generate_greedy(model, tokenizer, prompts, end_of_turn_id=eot, max_new_tokens=8, batch_size=6)
    single = [generate_greedy(model, tokenizer, [p], end_of_turn_id=eot, max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_a_short_run_lowers_the_loss_and_writes_a_loadable_checkpoint(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = SFTConfig(env_id=MATH, env_kwargs={"difficulty": 1}, steps=40, batch_size=32, eval_tasks=8)
    events = []
    summary = run_sft(tiny_model, tmp_path / "out", config, progress=events.append)
    assert summary["loss_last"] < 0.5 * summary["loss_first"]
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 41))
    assert [e["step"] for e in events if e["event"] == "eval"] == [0, 40]
    assert summary["num_eval_tasks"] == 8 and 0 <= summary["accuracy_after"] <= 1 and summary["train_accuracy_after"] is not None
    assert json.loads((tmp_path / "out" / "sft_summary.json").read_text()) == summary
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template and model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_stop_at_accuracy_ends_the_warm_start_at_the_first_eval_that_reaches_it(tiny_model, tmp_path):
    config = SFTConfig(env_id=MATH, env_kwargs={"difficulty": 1}, steps=300, eval_every=10, stop_at_accuracy=0.04, eval_tasks=25,
                       num_threads=1)
    summary = run_sft(tiny_model, tmp_path / "out", config)
    curve = summary["accuracy_curve"]
    assert summary["stopped_at_accuracy"] and summary["steps"] == curve[-1]["step"] < 300
    assert summary["accuracy_after"] == curve[-1]["accuracy"] >= 0.04
    assert all(point["accuracy"] < 0.04 for point in curve[:-1])  # it stopped at the first eval that got there
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="stop_at_accuracy needs eval_every"):
        SFTConfig(env_id=MATH, steps=10, stop_at_accuracy=0.5)


def test_the_same_seed_gives_the_same_run(tiny_model, tmp_path):
    from safetensors.torch import load_file

    config = SFTConfig(env_id=MATH, steps=3, batch_size=8, eval_tasks=2)
    a = run_sft(tiny_model, tmp_path / "a", config)
    b = run_sft(tiny_model, tmp_path / "b", config)
    assert a["loss_curve"] == b["loss_curve"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_a_mix_trains_on_every_env_by_weight_and_holds_out_each_envs_own_tasks(tiny_model, tmp_path, sandbox_root):
    """Math and Trace-v0 in one warm start: examples drawn by weight, each env's held-out set (Trace-v0's by program)
    kept out of training, accuracy per env, a stop target for one env only."""
    from cwm_rl.loop.tasks import held_out_tasks, split_key

    trace = {"mode": "output", "difficulty": 1}
    config = SFTConfig(mix=[{"id": MATH, "kwargs": {"difficulty": 1}, "weight": 3}, {"id": "cwm_rl/Trace-v0", "kwargs": trace}],
                       steps=6, batch_size=16, eval_tasks=10, eval_every=3, stop_at_accuracy={MATH: 1.0}, num_threads=1)
    events = []
    summary = run_sft(tiny_model, tmp_path / "out", config, progress=events.append)
    assert summary["envs"] == [MATH, "cwm_rl/Trace-v0"] and summary["env_id"] is None and not summary["stopped_at_accuracy"]
    assert set(summary["by_env"]) == {MATH, "cwm_rl/Trace-v0"}
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6] and all(set(e["by_env"]) == set(summary["by_env"]) for e in evals)
    for e in evals:  # the reported accuracy is the mean over envs, as a job's eval_accuracy
        assert e["accuracy"] == pytest.approx(sum(e["by_env"].values()) / 2)
    assert summary["accuracy_after"] == pytest.approx(sum(v["accuracy_after"] for v in summary["by_env"].values()) / 2)
    # Each env holds out what a job with the same seed holds out, and trained on other tasks only.
    trace_held = held_out_tasks(make_env("cwm_rl/Trace-v0", **trace), seed=0, num_tasks=10)
    math_held = held_out_tasks(make_env(MATH, difficulty=1), seed=0, num_tasks=10)
    assert set(summary["held_out_ids"]) == {t["id"] for t in trace_held + math_held}
    assert summary["by_env"]["cwm_rl/Trace-v0"]["num_eval_tasks"] == 10 and len({split_key(t) for t in trace_held}) == 10
    # 6 steps x 16 examples drawn 3:1; what each env trained on is counted apart (96 draws in all).
    math_n, trace_n = (summary["by_env"][k]["num_distinct_training_tasks"] for k in (MATH, "cwm_rl/Trace-v0"))
    assert math_n > trace_n > 5 and math_n + trace_n <= 96
    # Weight 0: evaluated, never trained on (what a job's transfer measurement needs).
    only_math = config.model_copy(update={"mix": [config.mix[0], config.mix[1].model_copy(update={"weight": 0})],
                                          "steps": 2, "stop_at_accuracy": None})
    zero = run_sft(tiny_model, tmp_path / "zero", only_math)["by_env"]["cwm_rl/Trace-v0"]
    assert zero["num_distinct_training_tasks"] == 0 and zero["train_accuracy_after"] is None and zero["num_eval_tasks"] == 10
    with pytest.raises(ValueError, match="every env of mix has weight 0"):
        SFTConfig(mix=[{"id": MATH, "weight": 0}], steps=1)
    with pytest.raises(ValueError, match="env_id .* or mix"):
        SFTConfig(steps=1)
    with pytest.raises(ValueError, match="not both"):
        SFTConfig(env_id=MATH, mix=[{"id": MATH}], steps=1)
    with pytest.raises(ValueError, match="names an env twice"):
        SFTConfig(mix=[{"id": MATH}, {"id": MATH, "weight": 2}], steps=1)
    with pytest.raises(ValueError, match="stop_at_accuracy names .*Echo"):
        SFTConfig(mix=[{"id": MATH}], steps=1, eval_every=1, stop_at_accuracy={"cwm_rl/Echo-v0": 0.5})


def test_trace_references_are_traced_in_one_sandbox_run_for_many_tasks(monkeypatch, fresh_trace_cache):
    """SFT data and a worker's request hand their tasks to env.prepare_tasks: Trace-v0 traces them all in one sandbox
    run, and a reset of any of them (in any env of the process) then runs nothing."""
    import envs.trace as trace_pkg
    from cwm_rl.loop.tasks import draw_task

    runs = []
    real = trace_pkg.run_traces
    monkeypatch.setattr(trace_pkg, "run_traces", lambda calls, **kw: runs.append(len(calls)) or real(calls, **kw))
    env = make_env("cwm_rl/Trace-v0", mode="output", difficulty=2)
    tasks = [draw_task(env, 10_000 + k) for k in range(40)]
    env.prepare_tasks(tasks)
    assert runs == [len({json.dumps([t.metadata["source"], t.metadata["args"]]) for t in tasks})]
    other = make_env("cwm_rl/Trace-v0", mode="output", difficulty=2)
    for task in tasks:
        other.reset(options={"task": task})
        reference = other.reference_action()
        _, reward, *_ = other.step(reference)
        assert reward == 1.0
    assert len(runs) == 1  # every reset and score took the prepared trace
    env.reset(options={"task": draw_task(env, 99)})  # an unprepared task is traced on its own, when its reference is asked
    env.reference_action()
    assert runs[1:] == [1]


class NoReferenceEnv(SingleTurnEnv):
    def sample_task(self, rng) -> Task:
        return Task(id="t", prompt="Say hi.")


def test_bad_input_is_refused_with_a_clear_message(tiny_model, tmp_path):
    if "cwm_rl_test/NoReference-v0" not in gym.registry:
        gym.register(id="cwm_rl_test/NoReference-v0", entry_point=NoReferenceEnv)
    with pytest.raises(ValueError, match="has no reference_action"):
        run_sft(tiny_model, tmp_path / "a", SFTConfig(env_id="cwm_rl_test/NoReference-v0", steps=1))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty; pick another directory or pass --force"):
        run_sft(tiny_model, tmp_path / "full", SFTConfig(env_id=MATH, steps=1))
    with pytest.raises(ValueError, match="is the --model directory"):
        run_sft(tiny_model, tiny_model, SFTConfig(env_id=MATH, steps=1), force=True)


def test_cli_runs_end_to_end(tiny_model, tmp_path):
    from cwm_rl.cli import app

    out = tmp_path / "sft"
    args = ["model", "sft", "--model", str(tiny_model), "--env", MATH, "--kwarg", "difficulty=1", "--steps", "4",
            "--batch-size", "8", "--eval-tasks", "4", "--threads", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "step 4/4  loss" in result.output
    assert "held-out accuracy: " in result.output and "(4 tasks)" in result.output
    assert (out / "model.safetensors").is_file() and (out / "sft_summary.json").is_file()
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, ValueError) and "--force" in str(again.exception)


def test_cli_names_the_known_envs_for_an_unknown_id(tiny_model, tmp_path):
    cli = str(Path(sys.executable).with_name("cwm-rl"))
    r = subprocess.run([cli, "model", "sft", "--model", str(tiny_model), "--env", "cwm_rl/Nope-v0", "--steps", "1",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 2
    assert "unknown env id 'cwm_rl/Nope-v0'" in r.stderr and MATH in r.stderr
