"""The SWE env's tools, CWM style: one call per turn, written in the model's text as

    <tool: bash>
    pytest -q tests/test_parse.py
    </tool>

    <tool: edit>
    path/to/file.py
    <<<<<<< SEARCH
    exact text to find (once)
    =======
    its replacement
    >>>>>>> REPLACE
    </tool>

    <tool: create>
    path/to/new_file.py
    the whole content
    </tool>

    <tool: submit>
    </tool>

Text outside the call (reasoning) is allowed. The body runs from the line after `<tool: NAME>` to
the LAST `</tool>` of the turn, so file contents may hold `</tool>`; a second `<tool:` opener in
the same turn is an error. An edit may hold several SEARCH/REPLACE blocks, applied in order; each
SEARCH must match the file exactly once. Paths are relative to the repository root.

Two formats for what the env writes back (`SWEEnv(format=...)`), with the same call syntax (CWM's own):
`text`, the results as they are with a `[budget: ...]` line, and `cwm`, CWM's SWE-RL format: a result is
`<output>` ... `</output>` then a `<budget>` block, in a `tool` message named after the tool, a submission
is quoted in `<submission>`, and a reply may reason first in one `<think>` ... `</think>` block, whose
text is not searched for a call. CWM's submit names a patch file; here it takes no argument in both
formats (the diff of the working tree is the submission).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOOLS = ("bash", "edit", "create", "submit")
FORMATS = ("text", "cwm")
THINK_END = "</think>"
_OPENER = re.compile(r"<tool:\s*([A-Za-z_]\w*)\s*>")
_BLOCK = re.compile(r"<<<<<<< SEARCH\n(.*?)\n?=======\n(.*?)\n?>>>>>>> REPLACE", re.S)

TOOLS_PROMPT = """You are working in a git repository at {workdir} (your current directory) to resolve the issue below. \
Use exactly one tool per turn, written as:

<tool: bash>
a shell command (a persistent bash session: cd and variables carry over; {timeout:g} s per command)
</tool>

<tool: edit>
path/relative/to/repo.py
<<<<<<< SEARCH
exact lines to replace (must appear exactly once)
=======
new lines
>>>>>>> REPLACE
</tool>

<tool: create>
path/relative/to/repo.py
the complete file content
</tool>

<tool: submit>
</tool>

`submit` ends the episode: your changes (the diff against the starting commit) are applied to a fresh copy of the \
repository and judged by hidden tests. The network is off."""

# The cwm format's prompt, laid out as CWM's system prompts are (a description, then `# Environment`).
CWM_TOOLS_PROMPT = """You are a helpful AI assistant.

# Environment

You are working in a Linux container, in a git repository at {workdir} (your current directory). You have {turns} \
and a budget of {tokens} tokens for the whole conversation. The network is off. Use exactly one tool per turn; you \
may reason before the call, once, inside <think> and </think>. The tools:

<tool: bash>
[command(s)]
</tool>
Runs the command(s) in a persistent bash session: cd and variables carry over; {timeout:g} s per command.

<tool: edit>
[path]
<<<<<<< SEARCH
[search_lines]
=======
[replacement_lines]
>>>>>>> REPLACE
</tool>
Replaces [search_lines], which must match exactly one run of lines of the existing file [path] (indentation \
included), with [replacement_lines]. Several SEARCH/REPLACE blocks apply in order.

<tool: create>
[path]
[content]
</tool>
Writes [content] to the file [path].

<tool: submit>
</tool>
Submits your changes (the diff against the starting commit, new files included) and ends the episode: they are \
applied to a fresh copy of the repository and judged by hidden tests.

Each result comes back as <output>...</output>, followed by a <budget> block with the turns and tokens you have \
left. A turn with no tool call, or more than one, gets a FormatError instead."""

CWM_ISSUE_PROMPT = """Resolve the following issue by changing the code in the repository, then submit your changes:

<issue_description>
{issue}
</issue_description>"""


@dataclass
class ToolCall:
    name: str
    body: str


def parse_tool_call(action: str) -> tuple[ToolCall | None, str | None]:
    """(the call, None), or (None, what is wrong with it)."""
    openers = list(_OPENER.finditer(action))
    if not openers:
        return None, "no tool call: every turn must use one tool (<tool: bash>, <tool: edit>, <tool: create> or <tool: submit>)"
    if len(openers) > 1:
        return None, f"one tool call per turn, got {len(openers)} `<tool:` openers"
    name = openers[0].group(1)
    if name not in TOOLS:
        return None, f"unknown tool {name!r}: the tools are {', '.join(TOOLS)}"
    end = action.rfind("</tool>")
    if end < openers[0].end():
        return None, f"the {name} call is not closed: end it with </tool>"
    body = action[openers[0].end(): end]
    body = body[1:] if body.startswith("\n") else body
    return ToolCall(name, body), None


def after_reasoning(action: str) -> tuple[str | None, str | None]:
    """(the reply after its one `</think>`, or all of it when it has none, None), or (None, what is wrong): CWM
    reasons before it calls, and a call it only thought about must not run. A `</think>` inside a call's body
    is the body's text (an edit of a file that holds one)."""
    at = action.find(THINK_END)
    if at < 0:
        return action, None
    openers = list(_OPENER.finditer(action[:at]))
    if len(_OPENER.findall(action)) == 1 and openers and action.find("</tool>", openers[-1].end()) not in range(0, at):
        return action, None  # that </think> is text inside a call's body (a file being edited), not the end of reasoning
    rest = action[at + len(THINK_END):]
    opener = _OPENER.search(rest)
    if THINK_END in (rest[:opener.start()] if opener else rest):
        return None, f"one {THINK_END} per turn: reason once inside <think> and </think>, then make one tool call"
    return rest, None


def cwm_output(text: str) -> str:
    """A tool's result, its last newline being the one before `</output>`."""
    text = text.removesuffix("\n")
    return f"<output>\n{text}\n</output>"


def cwm_budget(turns_left: int | None, tokens_left: int) -> str:
    turns = "unlimited" if turns_left is None else turns_left
    return f"<budget>\n* Remaining turns: {turns}\n* Remaining tokens: {tokens_left}\n</budget>"


def cwm_submission(patch: str, verdict: str) -> str:
    """A submit's result: the patch quoted back as CWM does, then the verdict."""
    return f"Your submission (the diff against the starting commit):\n\n<submission>\n{patch}\n</submission>\n\n{verdict}"


def parse_edit(body: str) -> tuple[str, list[tuple[str, str]]]:
    """(path, [(search, replace), ...]) of an edit call; ValueError says what is malformed."""
    path, _, rest = body.partition("\n")
    path = path.strip()
    if not path or path.startswith("<<<<<<<"):
        raise ValueError("an edit starts with the file's path on its own line")
    blocks = _BLOCK.findall(rest)
    if not blocks:
        raise ValueError("an edit needs a block: <<<<<<< SEARCH, the old lines, =======, the new lines, >>>>>>> REPLACE")
    if any(not search for search, _ in blocks):
        raise ValueError("a SEARCH part is empty: quote the exact lines to replace (use create for a new file)")
    return path, blocks


def apply_edit(text: str, blocks: list[tuple[str, str]]) -> str:
    """`text` with each block's SEARCH replaced by its REPLACE; ValueError when one matches 0 or 2+ times."""
    for number, (search, replace) in enumerate(blocks, 1):
        count = text.count(search)
        if count != 1:
            where = f"block {number}: " if len(blocks) > 1 else ""
            raise ValueError(f"{where}the SEARCH text appears {count} times in the file; it must appear exactly once "
                             f"({'copy it exactly, whitespace included' if count == 0 else 'add surrounding lines to make it unique'})")
        text = text.replace(search, replace, 1)
    return text


def parse_create(body: str) -> tuple[str, str]:
    path, _, content = body.partition("\n")
    if not path.strip():
        raise ValueError("a create starts with the file's path on its own line, then the content")
    return path.strip(), content
