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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOOLS = ("bash", "edit", "create", "submit")
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
