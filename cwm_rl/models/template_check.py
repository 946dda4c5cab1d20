"""`check_template(tokenizer)`: prove a chat template works for multi-turn token-in/token-out rollouts.

For each built-in conversation (math with `<think>` reasoning, tool use, tool messages with a tool
name as CWM's template writes them, indented code, a multi-turn echo game) it plays the worker's
part: render the first messages with a generation prompt, append each assistant message as the
model would generate it (content + end-of-turn token), then append `render_delta` of the
observation messages, and so on. After every turn it checks:
1. the incremental text equals the full render of the conversation so far (characters);
2. the token ids (first render, generated text, each delta, tokenised piece by piece) equal
   the ids of the full render tokenised at once (`add_special_tokens=False`);
3. at the end, every assistant message, past `<think>` reasoning included, is in the full
   render verbatim, and the BOS token (if the template writes one) appears once, at the start.
Each problem names the conversation, the turn, the offset and short excerpts of both sides.
Run it as `cwm-rl model check-template MODEL_DIR`.
"""

from __future__ import annotations

from typing import Any

from cwm_rl.models.chat_template import (
    Messages,
    TemplateError,
    detect_end_of_turn,
    excerpt,
    first_difference,
    render,
    render_delta,
)

SYSTEM_THINK = ("Solve the problem. First reason inside <think> ... </think>, then give your final answer "
                "after </think> within \\boxed{}, exactly once.")

CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "math-think": [
        {"role": "system", "content": SYSTEM_THINK},
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": "<think>\n12 + 7 = 19\n</think>\nThe answer is \\boxed{19}."},
        {"role": "user", "content": "Now, what is (19 - 4) * 3?"},
        {"role": "assistant", "content": "<think>\n19 - 4 = 15, and 15 * 3 = 45.\n</think>\n\\boxed{45}\n"},
        {"role": "user", "content": "Correct."},
        {"role": "assistant", "content": "<think>\nNothing left to do.\n</think>\nThank you!"},
    ],
    "tool-use": [
        {"role": "system", "content": "You can run tools. Call one with <tool_call>{...}</tool_call>."},
        {"role": "user", "content": "Fix the failing test in tests/test_add.py."},
        {"role": "assistant", "content": "<think>\nRun the tests first.\n</think>\n"
                                         "<tool_call>{\"name\": \"run_tests\", \"arguments\": {}}</tool_call>"},
        {"role": "tool", "content": "FAILED tests/test_add.py::test_add - assert 1 == 5\n1 failed in 0.02s"},
        {"role": "assistant", "content": "<think>\nadd() subtracts; it must add.\n</think>\n"
                                         "<tool_call>{\"name\": \"edit\", \"arguments\": {\"line\": 2, \"text\": \"return a + b\"}}</tool_call>"},
        {"role": "tool", "content": "edited src/add.py"},
        {"role": "user", "content": "Run the tests again."},
        {"role": "assistant", "content": "  <tool_call>{\"name\": \"run_tests\", \"arguments\": {}}</tool_call>  "},
        {"role": "tool", "content": "1 passed in 0.01s"},
        {"role": "assistant", "content": "All tests pass now: \\boxed{fixed}"},
    ],
    "named-tools": [  # CWM's template writes a tool message's header as `tool: NAME`
        {"role": "system", "content": "Fix the bug. Run a command with <tool: bash>\nCOMMAND\n</tool>."},
        {"role": "user", "content": "tests/test_add.py fails."},
        {"role": "assistant", "content": "<think>\nRead the test first.\n</think>\n<tool: bash>\ncat tests/test_add.py\n</tool>"},
        {"role": "tool", "name": "bash", "content": "<output>\ndef test_add():\n    assert add(2, 3) == 5\n</output>"},
        {"role": "assistant", "content": "<tool: python>\nprint(2 + 3)\n</tool>"},
        {"role": "tool", "name": "python", "content": "<output>\n5\n</output>"},
        {"role": "tool", "content": "a tool message without a name"},
        {"role": "assistant", "content": "<tool: submit>\n</tool>"},
    ],
    "code-indent": [
        {"role": "user", "content": "Write add(a, b) as a method body."},
        {"role": "assistant", "content": "    def add(self, a, b):\n        return a + b"},
        {"role": "user", "content": "Thanks. Now only the return line."},
        {"role": "assistant", "content": "        return a + b\n\n"},
    ],
    "echo-no-system": [
        {"role": "user", "content": "Repeat exactly: apple"},
        {"role": "assistant", "content": "apple"},
        {"role": "user", "content": "Repeat exactly: river"},
        {"role": "assistant", "content": "\nriver"},
        {"role": "user", "content": "Repeat exactly: stone"},
        {"role": "assistant", "content": "stone"},
    ],
}


def check_template(tokenizer: Any, end_of_turn: str | None = None,
                   conversations: dict[str, list[dict[str, str]]] | None = None) -> list[str]:
    """Problems that make `tokenizer`'s chat template unusable for incremental rendering ([] = OK)."""
    if not getattr(tokenizer, "chat_template", None):
        return ["the tokenizer has no chat template"]
    try:
        eot = end_of_turn if end_of_turn is not None else detect_end_of_turn(tokenizer)
    except Exception as e:  # a template that raises on the probe is a problem to report, not a crash
        return [f"cannot find the end-of-turn token: {e}"]
    problems: list[str] = []
    for name, messages in (conversations or CONVERSATIONS).items():
        try:
            problems += _check_incremental(tokenizer, name, messages, eot)
            problems += _check_final(tokenizer, name, messages)
        except Exception as e:
            problems.append(f"conversation {name!r}: rendering failed: {type(e).__name__}: {e}")
    return problems


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _turns(messages: Messages) -> list[tuple[int, int]]:
    """(index of an assistant message, index after its observation messages) for each assistant turn."""
    starts = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return list(zip(starts, starts[1:] + [len(messages)], strict=True))


def _check_incremental(tokenizer: Any, name: str, messages: Messages, eot: str) -> list[str]:
    """Play the worker turn by turn; the first divergence (string, then tokens) is the problem."""
    turns = _turns(messages)
    if not turns:
        raise ValueError(f"conversation {name!r} has no assistant message")
    text = render(tokenizer, messages[: turns[0][0]], add_generation_prompt=True)
    ids = _encode(tokenizer, text)
    for turn, (start, end) in enumerate(turns, 1):
        final = end == len(messages)
        roles = ", ".join(m["role"] for m in messages[start:end])
        where = f"conversation {name!r}, turn {turn} (messages {start}-{end - 1}: {roles})"
        generated = messages[start]["content"] + eot  # what the model emits, ending with its stop token
        try:
            delta = render_delta(tokenizer, messages[: start + 1], messages[start + 1: end],
                                 add_generation_prompt=not final, end_of_turn=eot)
        except TemplateError as e:
            return [f"{where}: {e}"]
        text += generated + delta
        ids += _encode(tokenizer, generated) + _encode(tokenizer, delta)
        full = render(tokenizer, messages[:end], add_generation_prompt=not final)
        if text != full:
            at = first_difference(text, full)
            return [f"{where}: incremental rendering differs from the full rendering at character {at}: "
                    f"incremental {excerpt(text, at)} vs full {excerpt(full, at)}"]
        full_ids = _encode(tokenizer, full)
        if ids != full_ids:
            return [f"{where}: {_token_difference(tokenizer, ids, full_ids, full)}"]
    return []


def _token_difference(tokenizer: Any, ids: list[int], full_ids: list[int], full: str) -> str:
    k = first_difference(ids, full_ids)
    try:
        offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        at = offsets[k][0] if k < len(offsets) else len(full)
    except (NotImplementedError, KeyError, TypeError):  # slow tokenizers have no offsets
        at = len(tokenizer.decode(full_ids[:k]))
    return (f"incremental tokenisation differs from tokenising the full rendering at token {k} (character {at}, "
            f"near {excerpt(full, at)}): incremental {tokenizer.convert_ids_to_tokens(ids[k:k + 4])} "
            f"vs full {tokenizer.convert_ids_to_tokens(full_ids[k:k + 4])}")


def _check_final(tokenizer: Any, name: str, messages: Messages) -> list[str]:
    """Every assistant message (past reasoning included) verbatim in the full render; BOS once, first."""
    problems = []
    full = render(tokenizer, messages, add_generation_prompt=False)
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and m["content"] not in full:
            kind = "past reasoning (<think>) is stripped or altered" if "<think>" in m["content"] else "its content is altered"
            problems.append(f"conversation {name!r}, message {i} (assistant): {kind} in the full rendering")
    bos = getattr(tokenizer, "bos_token", None)
    if bos and bos in full and (full.count(bos) > 1 or not full.startswith(bos)):
        problems.append(f"conversation {name!r}: the BOS token {bos!r} appears {full.count(bos)} time(s), "
                        f"first at character {full.find(bos)}; it must appear once, at the start")
    return problems
