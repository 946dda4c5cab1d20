"""CWM's execution-trace format: render the tracer's events as CWM's frames, parse them back.

CWM (Meta FAIR's Code World Model) was mid-trained on traces written with special tokens:

    <|begin_of_text|><|trace_context_start|>SOURCE<|frame_sep|>        the prompt: the source, whose
                                                                        entry line ends `# << START_OF_TRACE`
    <|call_sep|>LOCALS<|action_sep|>SOURCE_LINE<|frame_sep|>            the call (LOCALS: the arguments)
    <|line_sep|>LOCALS<|action_sep|>SOURCE_LINE<|frame_sep|>            SOURCE_LINE is about to run
    <|return_sep|><|action_sep|>SOURCE_LINE<|arg_sep|>VALUE<|frame_sep|>
    <|exception_sep|><|action_sep|>SOURCE_LINE<|arg_sep|>VALUE<|frame_sep|>
    <|end_of_text|>                                                     the entry point's scope exited

LOCALS is a JSON object whose values are JSON strings of the locals' reprs, diff-based: `".."` for a local
unchanged since its last occurrence. VALUE is a JSON string (the return value's repr; for an exception,
"Type: message"). SOURCE_LINE is the line's text without its indentation.

Special tokens go in as ids, never parsed from text: `prompt_parts` and `frame_parts` return
`cwm_rl.types.Part`-shaped dicts (`{"text": ...}` or `{"token": NAME}`), which the rollout worker
tokenises piece by piece. `parse_frames` reads the model's decoded output (special tokens by name) back
into frames, and `frames_to_events` maps frames to the tracer's events (`envs/trace/tracer.py`), resolving
each SOURCE_LINE to its line number.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any

BEGIN_OF_TEXT, END_OF_TEXT = "<|begin_of_text|>", "<|end_of_text|>"
FRAME_SEP, ACTION_SEP, RETURN_SEP, CALL_SEP = "<|frame_sep|>", "<|action_sep|>", "<|return_sep|>", "<|call_sep|>"
LINE_SEP, EXCEPTION_SEP, ARG_SEP, TRACE_CONTEXT_START = "<|line_sep|>", "<|exception_sep|>", "<|arg_sep|>", "<|trace_context_start|>"
# CWM's ids for them (its tokenizer, `cwm/text/tokenizers.py`); a model made here holds them at their names, not these ids.
TRACE_TOKEN_IDS = {FRAME_SEP: 128100, ACTION_SEP: 128101, RETURN_SEP: 128102, CALL_SEP: 128103, LINE_SEP: 128104,
                   EXCEPTION_SEP: 128105, ARG_SEP: 128106, TRACE_CONTEXT_START: 128107}
TRACE_TOKENS = list(TRACE_TOKEN_IDS)
START_MARKER = "# << START_OF_TRACE"
UNCHANGED = ".."
_KIND_OF_SEP = {CALL_SEP: "call", LINE_SEP: "line", RETURN_SEP: "return", EXCEPTION_SEP: "exception"}
_SEP_OF_KIND = {kind: sep for sep, kind in _KIND_OF_SEP.items()}
_SPECIAL = re.compile("|".join(re.escape(t) for t in [*TRACE_TOKENS, BEGIN_OF_TEXT, END_OF_TEXT]))


@dataclass(frozen=True)
class Frame:
    """One CWM frame, parsed: what scoring compares (locals as {name: repr or ".."}, values as reprs)."""

    kind: str  # call, line, return or exception
    source_line: str
    locals: dict[str, str] = field(default_factory=dict)
    value: str | None = None  # return / exception only

    def key(self) -> tuple:
        """A comparable form: reprs compared as Python values where they are literals (`[1,2]` == `[1, 2]`)."""
        return (self.kind, self.source_line.strip(), tuple(sorted((k, _canonical(v)) for k, v in self.locals.items())),
                None if self.value is None else _canonical(self.value))


def _canonical(text: str) -> str:
    try:
        return repr(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


# ---- rendering -----------------------------------------------------------------------------------

def marked_source(source: str, function: str) -> str:
    """`source` with the entry function's `def` line marked `# << START_OF_TRACE`: the module-level `def` the
    tracer calls (the last one of that name, as Python binds it; a method of the same name is not it)."""
    lines = source.rstrip("\n").split("\n")
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"the source does not parse ({e}); it cannot be traced") from None
    defs = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function]
    if not defs:
        raise ValueError(f"the source defines no module-level function {function!r} to mark as the trace's entry")
    at = defs[-1].lineno - 1  # the `def` line itself, after any decorators
    lines[at] = f"{lines[at]}  {START_MARKER}"
    return "\n".join(lines) + "\n"


def has_special_name(text: str) -> bool:
    """True when `text` holds a special token's name: a model's answer is decoded text, so such a name inside a
    local's repr or a source line would read as the token itself (`parse_frames` splits on them)."""
    return _SPECIAL.search(text) is not None


def prompt_parts(source: str, function: str) -> list[dict[str, str]]:
    """`<|begin_of_text|><|trace_context_start|>SOURCE<|frame_sep|>`: the trace prompt before any frame."""
    return [{"token": BEGIN_OF_TEXT}, {"token": TRACE_CONTEXT_START}, {"text": marked_source(source, function)},
            {"token": FRAME_SEP}]


def _repr_of(event: dict[str, Any], name: str) -> str:
    reprs = event.get("reprs") or {}
    return reprs[name] if name in reprs else repr(event["locals"][name])  # traces made before the tracer kept reprs


def event_frames(events: list[dict[str, Any]], source: str) -> list[Frame]:
    """The tracer's events as CWM frames (locals diff-based: ".." for each local unchanged since it last showed)."""
    lines = source.split("\n")
    frames, known = [], []  # every local named so far, in order of first appearance
    carried: dict[str, str] = {}  # changes seen at an exception event, which has no LOCALS: shown at the next frame
    for event in events:
        kind, number = event["event"], event["line"]
        text = lines[number - 1].strip() if 0 < number <= len(lines) else ""
        changed = {**carried, **{name: _repr_of(event, name) for name in event.get("locals", {})}}
        if kind in ("return", "exception"):
            value = event.get("exception", "") if kind == "exception" else event.get("value_repr") or repr(event.get("value"))
            frames.append(Frame(kind, text, value=value))
            carried = changed if kind == "exception" else {}
            continue
        carried = {}
        known += [name for name in changed if name not in known]
        frames.append(Frame(kind, text, {name: changed.get(name, UNCHANGED) for name in known}))
    return frames


def scope_exited(events: list[dict[str, Any]]) -> bool:
    """True when the trace ends with the entry function's return (False: the tracer cut it at max_events)."""
    return bool(events) and events[-1]["event"] == "return"


def frame_parts(frame: Frame) -> list[dict[str, str]]:
    """One frame as parts, ending with `<|frame_sep|>`."""
    parts = [{"token": _SEP_OF_KIND[frame.kind]}]
    if frame.kind in ("call", "line"):
        parts.append({"text": json.dumps(frame.locals)})
    parts += [{"token": ACTION_SEP}, {"text": frame.source_line}]
    if frame.kind in ("return", "exception"):
        parts += [{"token": ARG_SEP}, {"text": json.dumps(frame.value)}]
    return parts + [{"token": FRAME_SEP}]


def frames_parts(frames: list[Frame], *, end: bool = True) -> list[dict[str, str]]:
    """Frames one after another, and `<|end_of_text|>` after the last when `end` (the entry's scope exited)."""
    parts = [part for frame in frames for part in frame_parts(frame)]
    return parts + ([{"token": END_OF_TEXT}] if end else [])


def parts_text(parts: list[dict[str, str]]) -> str:
    """The parts as one string, special tokens by name: what a model's decoded output looks like."""
    return "".join(part.get("text", part.get("token", "")) for part in parts)


def render_cwm(source: str, function: str, events: list[dict[str, Any]]) -> str:
    """A whole trace in CWM's format, as text (special tokens by name): prompt, frames, and `<|end_of_text|>` when
    the function's scope exited (a trace cut at max_events ends after its last frame)."""
    return parts_text(prompt_parts(source, function) + frames_parts(event_frames(events, source), end=scope_exited(events)))


# ---- parsing -------------------------------------------------------------------------------------

class FormatError(ValueError):
    """Text that is not a sequence of CWM frames."""


def parse_frames(text: str) -> tuple[list[Frame], bool]:
    """Frames of decoded model output (special tokens by name), and whether `<|end_of_text|>` closed them.

    Text after `<|end_of_text|>`, a frame cut off or a malformed one raises FormatError."""
    ended = END_OF_TEXT in text
    text, _, after = text.partition(END_OF_TEXT)
    if after.strip():
        raise FormatError(f"text after {END_OF_TEXT}: {after[:60]!r} (the trace ends there)")
    frames = []
    chunks = text.split(FRAME_SEP)
    if chunks[-1].strip():
        raise FormatError(f"text after the last {FRAME_SEP}: {chunks[-1][:60]!r} (a frame cut off?)")
    for chunk in chunks[:-1]:
        frames.append(parse_frame(chunk))
    return frames, ended


def parse_frame(chunk: str) -> Frame:
    """One frame's text without its closing `<|frame_sep|>`."""
    tokens = [(m.group(), m.start(), m.end()) for m in _SPECIAL.finditer(chunk)]
    if not tokens or tokens[0][1] != 0 or tokens[0][0] not in _KIND_OF_SEP:
        raise FormatError(f"a frame must start with one of {', '.join(_KIND_OF_SEP)}: {chunk[:60]!r}")
    kind = _KIND_OF_SEP[tokens[0][0]]
    names = [t[0] for t in tokens]
    expected = [tokens[0][0], ACTION_SEP] + ([ARG_SEP] if kind in ("return", "exception") else [])
    if names != expected:
        raise FormatError(f"a {kind} frame is {' '.join(expected)} with text between, got {' '.join(names)}")
    head, line_start = chunk[tokens[0][2]:tokens[1][1]], tokens[1][2]
    if kind in ("call", "line"):
        try:
            local_vars = json.loads(head)
        except json.JSONDecodeError as e:
            raise FormatError(f"a {kind} frame's locals are not JSON ({e}): {head[:60]!r}") from None
        if not isinstance(local_vars, dict) or not all(isinstance(v, str) for v in local_vars.values()):
            raise FormatError(f"a {kind} frame's locals must be a JSON object of strings (reprs, or \"..\"): {head[:60]!r}")
        return Frame(kind, chunk[line_start:], local_vars)
    if head:
        raise FormatError(f"a {kind} frame has no locals, got {head[:60]!r}")
    raw_value = chunk[tokens[2][2]:]
    try:
        value = json.loads(raw_value)
    except json.JSONDecodeError as e:
        raise FormatError(f"a {kind} frame's value is not a JSON string ({e}): {raw_value[:60]!r}") from None
    if not isinstance(value, str):
        raise FormatError(f"a {kind} frame's value must be a JSON string (a repr), got {raw_value[:60]!r}")
    return Frame(kind, chunk[line_start:tokens[2][1]], value=value)


def similarity(predicted: list[Frame], reference: list[Frame]) -> tuple[float, dict[str, Any]]:
    """difflib's similarity of two frame sequences, 2*M / (len(predicted) + len(reference)), M the frames in
    matching blocks: 1 only for the exact trace (`rewards/trace.py` scores the text format the same way)."""
    a, b = [f.key() for f in predicted], [f.key() for f in reference]
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    matched = sum(block.size for block in matcher.get_matching_blocks())
    total = len(a) + len(b)
    score = 2 * matched / total if total else 1.0
    first = next((i for i, (p, r) in enumerate(zip(a, b, strict=False)) if p != r), None if len(a) == len(b) else min(len(a), len(b)))
    return score, {"verdict": "correct" if score == 1.0 else "partial" if score > 0 else "wrong", "score": round(score, 4),
                   "matched_frames": matched, "predicted_frames": len(a), "reference_frames": len(b), "first_mismatch": first,
                   "reason": "exact trace" if score == 1.0 else f"{matched} of {len(b)} reference frames matched"}


def frame_mismatch(predicted: Frame, reference: Frame | None) -> list[str]:
    """What differs between a predicted frame and the real one, field by field (empty when they match)."""
    if reference is None:
        return ["no frame expected"]
    out = []
    if predicted.kind != reference.kind:
        out.append(f"kind: {predicted.kind} vs {reference.kind}")
    if predicted.source_line.strip() != reference.source_line.strip():
        out.append(f"line: {predicted.source_line.strip()!r} vs {reference.source_line.strip()!r}")
    for name in sorted(set(predicted.locals) | set(reference.locals), key=lambda n: (n not in reference.locals, n)):
        got, want = predicted.locals.get(name), reference.locals.get(name)
        if got is None or want is None or _canonical(got) != _canonical(want):
            out.append(f"{name}: {got if got is not None else '(missing)'} vs {want if want is not None else '(absent)'}")
    if (predicted.value is None) != (reference.value is None) or (
            predicted.value is not None and _canonical(predicted.value) != _canonical(reference.value)):
        out.append(f"value: {predicted.value} vs {reference.value}")
    return out


def frames_to_events(frames: list[Frame], source: str) -> list[dict[str, Any]]:
    """Frames back to the tracer's events: line numbers from SOURCE_LINE (of equal lines, the first after the
    previous frame's, else the first), locals only where changed, reprs in `reprs`, values in `value_repr`."""
    lines = [line.strip() for line in source.split("\n")]
    events, previous = [], 0
    for frame in frames:
        candidates = [i + 1 for i, line in enumerate(lines) if line == frame.source_line.strip()]
        if frame.kind == "call":  # the def line carries the start marker in the prompt, not in the frame
            candidates = candidates or [i + 1 for i, line in enumerate(lines) if line.startswith(frame.source_line.strip())]
        number = next((c for c in candidates if c > previous), candidates[0] if candidates else 0)
        previous = number or previous
        event: dict[str, Any] = {"event": frame.kind, "line": number}
        if frame.kind in ("call", "line"):
            changed = {k: v for k, v in frame.locals.items() if v != UNCHANGED}
            event["locals"] = {k: _value_of(v) for k, v in changed.items()}
            event["reprs"] = changed
        elif frame.kind == "return":
            event.update(locals={}, reprs={}, value=_value_of(frame.value or ""), value_repr=frame.value)
        else:
            event.update(locals={}, reprs={}, exception=frame.value)
        events.append(event)
    return events


def _value_of(text: str) -> Any:
    """A repr as the tracer's JSON value where it is a literal (lists for tuples, as the tracer encodes), else the repr."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    return _encoded(value, text)


def _encoded(value: Any, text: str) -> Any:
    """What the tracer's `encode` makes of a literal: tuples as lists; a dict with other than str keys, or a
    float the JSON cannot hold, as its repr."""
    def plain(v: Any) -> bool:
        if isinstance(v, float):
            return v == v and v not in (float("inf"), float("-inf"))
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return v is None or isinstance(v, (bool, int, str))
    return json.loads(json.dumps(value)) if plain(value) else text
