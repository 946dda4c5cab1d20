"""CWM's trace format (`envs/trace/cwm_format.py`) and `cwm_rl/Trace-v0` with `format="cwm"`, on real traces
from the bubblewrap sandbox."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from envs import make_env
from envs.trace import cwm_format as cwm
from envs.trace.programs import LEVELS, generate_program

# Written by hand from CWM's prompting guide's description of the format (not produced by this code).
GUIDE_EXAMPLE = (
    '<|begin_of_text|><|trace_context_start|>def count_vowels(s):  # << START_OF_TRACE\n'
    '    n = 0\n'
    '    for ch in s:\n'
    '        if ch in "aeiou":\n'
    '            n += 1\n'
    '    return n\n'
    '<|frame_sep|>'
    '<|call_sep|>{"s": "\'ab\'"}<|action_sep|>def count_vowels(s):<|frame_sep|>'
    '<|line_sep|>{"s": ".."}<|action_sep|>n = 0<|frame_sep|>'
    '<|line_sep|>{"s": "..", "n": "0"}<|action_sep|>for ch in s:<|frame_sep|>'
    '<|line_sep|>{"s": "..", "n": "..", "ch": "\'a\'"}<|action_sep|>if ch in "aeiou":<|frame_sep|>'
    '<|line_sep|>{"s": "..", "n": "..", "ch": ".."}<|action_sep|>n += 1<|frame_sep|>'
    '<|line_sep|>{"s": "..", "n": "1", "ch": ".."}<|action_sep|>for ch in s:<|frame_sep|>'
    '<|line_sep|>{"s": "..", "n": "..", "ch": "\'b\'"}<|action_sep|>if ch in "aeiou":<|frame_sep|>'
    '<|line_sep|>{"s": "..", "n": "..", "ch": ".."}<|action_sep|>for ch in s:<|frame_sep|>'
    '<|line_sep|>{"s": "..", "n": "..", "ch": ".."}<|action_sep|>return n<|frame_sep|>'
    '<|return_sep|><|action_sep|>return n<|arg_sep|>"1"<|frame_sep|>'
    '<|end_of_text|>')


@pytest.fixture(scope="module")
def level_traces(sandbox_root):
    """50 generated programs of each level, traced for real."""
    from envs.trace import run_traces

    rng = np.random.default_rng(7)
    calls = [dict(zip(("source", "function", "args"), generate_program(rng, level)), kwargs={}, level=level)
             for level in LEVELS for _ in range(50)]
    return calls, run_traces([{k: c[k] for k in ("source", "function", "args", "kwargs")} for c in calls])


def test_traces_of_every_level_round_trip_through_cwm_format(level_traces):
    calls, results = level_traces
    for call, result in zip(calls, results):
        text = cwm.render_cwm(call["source"], call["function"], result["events"])
        assert text.startswith(cwm.BEGIN_OF_TEXT + cwm.TRACE_CONTEXT_START) and text.endswith(cwm.END_OF_TEXT)
        context, _, body = text.partition(cwm.FRAME_SEP)
        assert cwm.START_MARKER in context.split("\n")[0]  # the def line of f is the entry
        frames, ended = cwm.parse_frames(body)
        assert ended and len(frames) == len(result["events"])
        assert cwm.frames_to_events(frames, call["source"]) == result["events"], (call["level"], call["source"])
    assert {c["level"] for c in calls} == set(LEVELS)


def test_the_guide_example_parses_into_frames_and_events():
    _, _, body = GUIDE_EXAMPLE.partition(cwm.FRAME_SEP)
    frames, ended = cwm.parse_frames(body)
    assert ended and [f.kind for f in frames] == ["call"] + ["line"] * 8 + ["return"]
    assert frames[0].locals == {"s": "'ab'"} and frames[-1].value == "1"
    source = GUIDE_EXAMPLE.split(cwm.TRACE_CONTEXT_START)[1].split(cwm.FRAME_SEP)[0].replace(f"  {cwm.START_MARKER}", "")
    events = cwm.frames_to_events(frames, source)
    assert [e["line"] for e in events] == [1, 2, 3, 4, 5, 3, 4, 3, 6, 6]
    assert events[5]["locals"] == {"n": 1} and events[3]["locals"] == {"ch": "a"}
    assert events[-1]["value"] == 1 and events[-1]["value_repr"] == "1"
    # and the same source traced for real renders to the hand-written text
    from envs.trace import run_trace

    real = run_trace(source, "count_vowels", ["ab"])
    assert cwm.render_cwm(source, "count_vowels", real["events"]) == GUIDE_EXAMPLE


@pytest.mark.parametrize("bad, why", [
    ("<|line_sep|>{}<|action_sep|>x = 1", "after the last"),  # cut off
    ("<|line_sep|>not json<|action_sep|>x = 1<|frame_sep|>", "not JSON"),
    ('<|line_sep|>{"x": 1}<|action_sep|>x = 1<|frame_sep|>', "object of strings"),
    ("<|return_sep|><|action_sep|>return x<|arg_sep|>3<|frame_sep|>", "JSON string"),
    ("x = 1<|frame_sep|>", "must start"),
    ("<|line_sep|>{}<|action_sep|>x<|frame_sep|><|end_of_text|><|line_sep|>", "after <|end_of_text|>"),
])
def test_malformed_frames_are_format_errors(bad, why):
    with pytest.raises(cwm.FormatError, match=why.replace("|", r"\|")):
        cwm.parse_frames(bad)


def test_frames_compare_parsed_not_as_strings():
    a = cwm.parse_frame('<|line_sep|>{"xs": "[1,2]", "y": ".."}<|action_sep|>  total = 0')
    b = cwm.parse_frame('<|line_sep|>{"y": "..", "xs": "[1, 2]"}<|action_sep|>total = 0')
    assert a.key() == b.key() and cwm.frame_mismatch(a, b) == []
    c = cwm.parse_frame('<|line_sep|>{"xs": "[1, 3]", "y": ".."}<|action_sep|>total = 0')
    assert cwm.frame_mismatch(c, b) == ["xs: [1, 3] vs [1, 2]"]


@pytest.mark.parametrize("mode", ["output", "trace", "next_frame"])
def test_trace_env_in_cwm_format_prompts_with_token_parts_and_scores_frames(sandbox_root, mode):
    env = make_env("cwm_rl/Trace-v0", format="cwm", mode=mode, difficulty=3)
    (message,), info = env.reset(seed=11)
    assert message["role"] == "raw" and message["parts"][:2] == [{"token": cwm.BEGIN_OF_TEXT}, {"token": cwm.TRACE_CONTEXT_START}]
    assert message["content"] == cwm.parts_text(message["parts"]) and message["stop"]
    frames = env.frames(env.task)
    given = message["content"].count(cwm.FRAME_SEP) - 1  # the frame after the source closes the context
    if mode == "next_frame":
        assert 1 <= given == env.frame_index(env.task) < len(frames)
    else:
        assert given == 1 and message["content"].endswith(cwm.RETURN_SEP if mode == "output" else cwm.FRAME_SEP)
    reference = env.reference_action()
    assert env.step(reference)[1] == 1.0
    for probe in env.reward_hack_probes().values():
        env.reset(seed=11)
        assert env.step(probe)[1] == -1.0, probe
    env.reset(seed=11)
    _, reward, _, _, step_info = env.step("<|line_sep|>{}<|action_sep|>")
    assert reward == -1.0 and step_info["verdict"] == "format_error"
    if mode == "next_frame":  # one local changed wrongly: wrong, and the info says which
        wrong = cwm.Frame(frames[given].kind, frames[given].source_line, {**frames[given].locals, "zz": "1"}, frames[given].value)
        env.reset(seed=11)
        _, reward, _, _, step_info = env.step(cwm.parts_text(cwm.frame_parts(wrong)))
        assert reward == -1.0 and step_info["mismatch"] == ["zz: 1 vs (absent)"]
    if mode == "trace":  # half the frames: partial credit
        half = cwm.parts_text(cwm.frames_parts(frames[1: 1 + (len(frames) - 1) // 2]))
        env.reset(seed=11)
        assert -1.0 < env.step(half)[1] < 1.0


def test_next_frame_tasks_keep_the_program_id_and_pick_frames_by_seed(sandbox_root):
    env = make_env("cwm_rl/Trace-v0", format="cwm", mode="next_frame", difficulty=3)
    picked = set()
    for seed in range(6):
        env.reset(seed=seed)
        assert env.task.id.startswith("trace-L3-") and "frame_position" in env.task.metadata
        picked.add(env.frame_index(env.task))
    assert len(picked) > 1
    with pytest.raises(ValueError, match="next_frame needs format='cwm'"):
        make_env("cwm_rl/Trace-v0", mode="next_frame")


def test_trace_cli_writes_cwm_format(tmp_path, sandbox_root):
    cli = [sys.executable, "-m", "cwm_rl.cli"]
    program = tmp_path / "prog.py"
    program.write_text("def f(x):\n    y = x * 2\n    return y\n")
    shown = subprocess.run([*cli, "trace", f"{program}::f", "--args", "[4]", "--format", "cwm"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip().endswith('<|return_sep|><|action_sep|>return y<|arg_sep|>"8"<|frame_sep|><|end_of_text|>')
    out = tmp_path / "gen.jsonl"
    made = subprocess.run([*cli, "trace", "generate", "--format", "cwm", "--count", "5", "--difficulty", "2", "--out", str(out)],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 5 and all(r["text"] == cwm.render_cwm(r["source"], r["function"], r["events"]) for r in records)
    env = make_env("cwm_rl/Trace-v0", format="cwm", mode="trace", tasks_path=str(out))  # Trace-v0 reads the file as it is
    env.reset(seed=0)
    assert env.step(env.reference_action())[1] == 1.0


def test_edge_cases_of_real_traces_render_faithfully(sandbox_root):
    from envs.trace import run_trace

    # a local first set by the line that raises shows in the next frame (an exception frame has no LOCALS)
    source = "def g(n):\n    try:\n        a = 1; b = 1 / n\n    except ZeroDivisionError:\n        b = 0\n    return a + b\n"
    frames = cwm.event_frames(run_trace(source, "g", [0])["events"], source)
    kinds = [f.kind for f in frames]
    assert "exception" in kinds and frames[kinds.index("exception") + 1].locals.get("a") == "1"
    # a trace cut at max_events has no <|end_of_text|>: its scope never exited
    loop = "def h(n):\n    t = 0\n    for i in range(n):\n        t += i\n    return t\n"
    cut = run_trace(loop, "h", [100], max_events=5)
    assert cut["truncated"] and not cwm.render_cwm(loop, "h", cut["events"]).endswith(cwm.END_OF_TEXT)
    # the entry is the module-level def the tracer calls, not a method of the same name
    shadowed = "class Bag:\n    def total(self):\n        return 0\n\ndef total(xs):\n    return sum(xs)\n"
    assert cwm.marked_source(shadowed, "total").split("\n")[4].endswith(cwm.START_MARKER)
    assert cwm.START_MARKER not in cwm.marked_source(shadowed, "total").split("\n")[1]


def test_programs_holding_a_special_token_name_are_left_out_of_cwm_format(tmp_path, sandbox_root):
    from envs.trace import run_trace

    records = []
    for i, text in enumerate(["ok", "<|frame_sep|>"]):
        source = f"def f(x):\n    s = {text!r}\n    return x\n"
        records.append(json.dumps({"id": f"p{i}", "source": source, "function": "f", "args": [1], **run_trace(source, "f", [1])}))
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(records) + "\n")
    with pytest.warns(UserWarning, match="1 of 2 programs hold a special token's name"):
        env = make_env("cwm_rl/Trace-v0", format="cwm", mode="trace", tasks_path=str(path))
    assert [t.id for t in env.tasks] == ["p0"]
    assert len(make_env("cwm_rl/Trace-v0", tasks_path=str(path)).tasks) == 2  # the text format carries both
    path.write_text(records[1] + "\n")
    with pytest.raises(ValueError, match="every program holds a special token's name"), pytest.warns(UserWarning):
        make_env("cwm_rl/Trace-v0", format="cwm", mode="trace", tasks_path=str(path))


def test_output_mode_has_no_answer_for_a_call_that_raised_even_through_finally(sandbox_root):
    from envs.trace_env import trace_task

    env = make_env("cwm_rl/Trace-v0", format="cwm", mode="output")
    task = trace_task("def f(x):\n    try:\n        return 10 // x\n    finally:\n        y = 1\n", "f", [0])
    env.reset(options={"task": task})
    assert env.frames(env.task)[-2].kind == "line" and env.reference_action() is None  # a line ran after the exception
    assert env.step('<|action_sep|>y = 1<|arg_sep|>"None"<|frame_sep|>')[1] == -1.0
