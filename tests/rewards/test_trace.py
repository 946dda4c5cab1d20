"""rewards/trace.py on hand-made events: the trace text format (`render_event`/`render_trace`,
read back by `parse_trace`), `tag`, exact output scoring (`score_output`) and trace similarity with
partial credit (`score_trace`), malformed answers included. Traces from the real tracer are scored
in tests/envs/test_trace_env.py."""

from __future__ import annotations

import pytest

from rewards.trace import parse_trace, render_event, render_trace, score_output, score_trace, tag

EVENTS = [
    {"event": "call", "line": 1, "locals": {"xs": [1, 2]}},
    {"event": "line", "line": 2, "locals": {}},
    {"event": "line", "line": 3, "locals": {"s": 0, "a": "b"}},
    {"event": "exception", "line": 3, "locals": {}, "exception": "KeyError: 'k'"},
    {"event": "return", "line": 3, "locals": {}, "value": None},
]
REFERENCE = {"return_repr": "[1, 'a', (2, 3)]", "stdout": "hi\n"}


def traced(lines: list[str]) -> str:
    return "<trace>\n" + "\n".join(lines) + "\n</trace>"


def test_render_event_writes_one_line_per_event():
    assert [render_event(e) for e in EVENTS] == [
        'call 1: {"xs": [1, 2]}', "line 2: {}", 'line 3: {"a": "b", "s": 0}', "exception 3: KeyError: 'k'", "return 3: null"]
    assert render_event({"event": "line", "line": 4}) == "line 4: {}"
    assert render_event({"event": "return", "line": 5, "value": {"k": [1, None], "t": "a\nb"}}) == \
        'return 5: {"k": [1, null], "t": "a\\nb"}'


def test_rendered_traces_parse_back_and_score_exactly():
    events, bad = parse_trace(render_trace(EVENTS))
    assert len(events) == len(EVENTS) and bad == []
    score, info = score_trace(traced(render_trace(EVENTS).splitlines()), EVENTS)
    assert score == 1.0 and info["verdict"] == "correct" and info["first_mismatch"] is None


def test_parse_trace_compares_json_values_not_their_spelling():
    def one(line: str):
        events, bad = parse_trace(line)
        assert bad == [] and len(events) == 1, line
        return events[0]

    assert one('  call 1:{"b":2,"a":[1,2]}  ') == one('call 1: {"a": [1, 2], "b": 2}')
    assert one('line 3: {"s": 0}') != one('line 3: {"s": 0.0}')  # 0 is not 0.0
    assert one("line 3: {s: 0}") != one('line 3: {"s": 0}')  # not JSON: never equal to the JSON form
    assert one("exception 3:   KeyError: 'k'  ") == one("exception 3: KeyError: 'k'")


def test_parse_trace_sets_aside_lines_that_are_not_events():
    events, bad = parse_trace("call 1: {}\n\nNext it loops.\nlines 2: {}\nline two: {}\nreturn: 3\nline 2: {}\n")
    assert len(events) == 2 and bad == ["Next it loops.", "lines 2: {}", "line two: {}", "return: 3"]


def test_tag_wants_exactly_one_of_the_named_tag():
    assert tag("x <trace>\na\nb\n</trace> y", "trace") == ("\na\nb\n", "")
    assert tag("<return>1</return><return>2</return>", "return") == (None, "expected exactly one <return>...</return>, found 2")
    assert tag("<return>1", "return")[0] is None
    assert tag("<stdout>1</stdout>", "return")[0] is None


@pytest.mark.parametrize("answer", ["<return>[1,'a',(2,3)]</return><stdout>hi</stdout>",
                                    '<return>\n[1, "a", (2, 3)]\n</return>\n<stdout>\nhi\n\n</stdout>'])
def test_output_is_compared_as_python_literals(answer):
    assert score_output(answer, REFERENCE) == (True, {"verdict": "correct", "reason": "correct",
                                                      "expected_return": REFERENCE["return_repr"], "expected_stdout": "hi\n"})


@pytest.mark.parametrize(("answer", "reason"), [
    ("<return>[1, 'a', [2, 3]]</return><stdout>hi</stdout>", "wrong return value"),  # a list is not a tuple
    ("<return>[1.0, 'a', (2, 3)]</return><stdout>hi</stdout>", "wrong return value"),
    ("<return>[1, 'a', (2, 3)]</return>", "wrong printed output"),  # the call printed
    ("<return>[1, 'a', (2, 3)]</return><stdout>  hi</stdout>", "wrong printed output"),
    ("<return>[1, 'a', (2, 3)]</return><stdout>hi</stdout><stdout>hi</stdout>", "wrong printed output"),
    ("<return>[2]</return><stdout>bye</stdout>", "wrong return value"),
])
def test_wrong_outputs(answer, reason):
    correct, info = score_output(answer, REFERENCE)
    assert not correct and info["verdict"] == "wrong" and info["reason"] == reason


def test_output_of_a_call_that_prints_nothing():
    quiet = {"return_repr": "3"}
    assert score_output("<return>3</return>", quiet)[0] and score_output("<return>3</return><stdout></stdout>", quiet)[0]
    assert not score_output("<return>3</return><stdout>3</stdout>", quiet)[0]
    assert not score_output("<return>3</return><stdout></stdout><stdout></stdout>", quiet)[0]  # one or none


def test_a_return_value_that_is_not_a_literal_is_compared_as_text():
    assert score_output("<return> inf </return>", {"return_repr": "inf"})[0]
    assert not score_output("<return>float('inf')</return>", {"return_repr": "inf"})[0]
    assert score_output("<return><Node 1></return>", {"return_repr": "<Node 1>"})[0]
    assert not score_output("<return>[]</return>", {"return_repr": "<Node 1>"})[0]


def test_malformed_output_answers_fail_without_raising():
    assert score_output("<stdout>hi</stdout>", REFERENCE) == (False, {
        "verdict": "format_error", "reason": "expected exactly one <return>...</return>, found 0"})
    deep = "[" * 100_000 + "]" * 100_000
    assert score_output(f"<return>{deep}</return><stdout>hi</stdout>", REFERENCE)[0] is False
    assert score_output("<return>" + "9" * 10_000 + "</return>", {"return_repr": "1"})[0] is False


def test_trace_scores_give_partial_credit():
    lines = render_trace(EVENTS).splitlines()
    cases = {  # predicted lines: (score, first mismatch)
        "prefix": (lines[:2], 2 * 2 / (2 + 5), 2),
        "an extra event": (lines[:1] + ["line 9: {}"] + lines[1:], 2 * 5 / (6 + 5), 1),
        "the trace twice": (lines + lines, 2 * 5 / (10 + 5), 5),
        "a wrong value": (lines[:2] + ['line 3: {"a": "b", "s": 1}'] + lines[3:], 2 * 4 / (5 + 5), 2),
        "two events swapped": ([lines[0], lines[2], lines[1]] + lines[3:], 2 * 4 / (5 + 5), 1),
    }
    for name, (predicted, expected, first) in cases.items():
        score, info = score_trace(traced(predicted), EVENTS)
        assert score == pytest.approx(expected), name
        assert info["verdict"] == "partial" and info["first_mismatch"] == first, name


def test_prose_inside_the_trace_is_counted_but_costs_nothing():
    lines = render_trace(EVENTS).splitlines()
    score, info = score_trace(traced(lines[:2] + ["then the loop starts"] + lines[2:]), EVENTS)
    assert score == 1.0 and info["unparsed_lines"] == 1


def test_empty_and_malformed_traces():
    score, info = score_trace("<trace>\n</trace>", EVENTS)
    assert score == 0.0 and info["verdict"] == "wrong" and info["reason"] == "0 of 5 reference events matched"
    assert score_trace("<trace></trace>", [])[0] == 1.0
    for answer in ("line 1: {}", "<trace>a</trace><trace>b</trace>", "<trace>\ncall 1: {}\n"):
        score, info = score_trace(answer, EVENTS)
        assert score == 0.0 and info["verdict"] == "format_error", answer
