"""CWM's `python` tool for single-answer envs (Code-v0, Math-v0): run code, see its output, then answer.

Syntax (one call per turn): the model writes

    <tool: python>
    print(2 ** 100)
    </tool>

and the env runs the code in the sandbox (a fresh one per call: no state carries over) and
answers with a `tool` message holding `<output> ... </output>`, the exit status when it is not 0,
the limits hit, and how many calls are left. A turn without a tool call is the final answer,
graded as usual; a call on the last turn is graded as the answer it is (and so fails the format).
The tool turns carry reward 0; only the answer is rewarded.
"""

from __future__ import annotations

import re
from typing import Any

TOOL_CALL = re.compile(r"<tool:\s*python\s*>\n?(.*?)</tool>", re.S)
TOOL_PROMPT = ("You can run Python code before answering: write\n<tool: python>\nCODE\n</tool>\nalone in a turn and "
               "the output comes back in the next message ({n} call(s) at most; each runs in a fresh sandbox). "
               "Then answer.")
OUTPUT_CHARS = 2000


def find_tool_call(action: str) -> tuple[str | None, str | None]:
    """(code, None) for one python call in `action`, (None, error) for a malformed one, (None, None) for none."""
    calls = TOOL_CALL.findall(action)
    if not calls:
        return (None, "malformed tool call: write <tool: python>, the code, then </tool>") if "<tool:" in action else (None, None)
    if len(calls) > 1:
        return None, f"one tool call per turn, got {len(calls)}; only the answer or a single call is accepted"
    return calls[0], None


def run_python(code: str, sandbox, limits=None) -> str:
    """Run `code` with python3 in the sandbox; the observation text the model sees."""
    result = sandbox.run(["python3", "tool.py"], files={"tool.py": code}, limits=limits)
    text = result.stdout + result.stderr
    if len(text) > OUTPUT_CHARS:
        text = text[:OUTPUT_CHARS // 2] + "\n...[output cut]...\n" + text[-OUTPUT_CHARS // 2:]
    notes = []
    if result.exit_code not in (0, None):
        notes.append(f"exit status {result.exit_code}")
    if result.limits_hit:
        notes.append(f"limits hit: {', '.join(result.limits_hit)}")
    return f"<output>\n{text}</output>" + (f"\n[{'; '.join(notes)}]" if notes else "")


class PythonToolMixin:
    """Mix into a SingleTurnEnv subclass (before it in the bases) to offer the python tool for
    `tool_calls` turns before the answer. Call `_setup_python_tool` at the end of `__init__`."""

    tool_calls: int = 0

    def _setup_python_tool(self, tool_calls: int, sandbox: str, timeout_s: float, memory_mb: int) -> None:
        from envs.sandbox import Limits, check_backend

        if tool_calls < 0:
            raise ValueError(f"tool_calls must be >= 0, got {tool_calls}")
        self.tool_calls, self.sandbox_backend = tool_calls, check_backend(sandbox)
        self.tool_limits = Limits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)), memory_mb=memory_mb, output_bytes=1 << 16)
        self.max_turns = tool_calls + 1
        if tool_calls:
            self.system_prompt = f"{self.system_prompt} {TOOL_PROMPT.format(n=tool_calls)}"

    def respond(self, action: str) -> tuple[list[dict[str, str]], float, bool, bool, dict[str, Any]]:
        if self.tool_calls and self.num_turns < self.max_turns - 1:
            code, error = find_tool_call(action)
            if code is not None or error is not None:
                from envs.sandbox import shared_sandbox

                output = error or run_python(code, shared_sandbox(self.sandbox_backend), self.tool_limits)
                left = self.max_turns - 2 - self.num_turns
                return ([{"role": "tool", "content": f"{output}\n[{left} tool call(s) left]"}], 0.0, False, False,
                        {"tool": "python", "tool_error": error, "tool_calls_left": left})
        return super().respond(action)
