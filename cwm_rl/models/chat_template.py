"""The chat templates of cwm-rl's models, and rendering helpers for token-in/token-out workers.

The default template (`CHAT_TEMPLATE`) is ChatML with a BOS token at the start of a conversation:

    <|begin_of_text|><|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n            <- add_generation_prompt=True appends this

`CWM_CHAT_TEMPLATE` is CWM's (a model made with `--tokenizer cwm`), so a config moves to a CWM
checkpoint by its model path alone:

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>tool: bash<|end_header_id|>\\n\\n{content}<|eot_id|>      <- a tool message named bash
    <|start_header_id|>assistant<|end_header_id|>\\n\\n       <- add_generation_prompt=True appends this

Roles: system, user, assistant, tool. Content is written verbatim: nothing is stripped,
trimmed or rewritten (past `<think>` reasoning stays), so rendering a longer conversation only
ever appends text to the rendering of a shorter one (prefix consistency).

A multi-turn worker renders the first messages once, appends what the model generates (ending
with the end-of-turn token, `<|im_end|>` or `<|eot_id|>`, on which generation stops), and then appends
only `render_delta(...)` for each new observation: the text after the end-of-turn token up to
the next generation prompt (for ChatML `\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`).
`render_delta` works for any Hugging Face tokenizer with a chat template and raises
`TemplateError` where the template cannot be used that way (`cwm-rl model check-template`
explains in detail). Tokenise rendered text with `add_special_tokens=False`: the template
already writes BOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Messages = Sequence[dict[str, Any]]

CHAT_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('unknown role ' ~ message['role'] ~ ': use system, user, assistant or tool') }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# CWM's chat format (facebookresearch/cwm, PROMPTING_GUIDE.md): a tool message's header names its tool.
CWM_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('unknown role ' ~ message['role'] ~ ': use system, user, assistant or tool') }}
    {%- endif %}
    {%- set header = message['role'] %}
    {%- if message['role'] == 'tool' and message.get('name') %}
        {%- set header = 'tool: ' ~ message['name'] %}
    {%- endif %}
    {{- '<|start_header_id|>' + header + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


class TemplateError(ValueError):
    """The chat template cannot be used for incremental (token-in/token-out) rendering."""


def render(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages` (no tokenisation)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def first_difference(a: str | Sequence, b: str | Sequence) -> int:
    """Index of the first position where `a` and `b` differ (the shorter length if one is a prefix)."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def excerpt(text: str, at: int, width: int = 24) -> str:
    """`repr` of `text` around character `at` (`width` characters either side)."""
    return repr(text[max(0, at - width): at + width])


def detect_end_of_turn(tokenizer: Any) -> str:
    """The special token the template writes right after an assistant message's content.

    It is the token the model generates to end its turn (and generation stops on).
    """
    probe = "cwm-rl probe answer 7"
    text = render(tokenizer, [{"role": "user", "content": "cwm-rl probe question"}, {"role": "assistant", "content": probe}])
    at = text.rfind(probe)
    if at < 0:
        raise TemplateError("the chat template does not write an assistant message's content verbatim")
    tail = text[at + len(probe):]
    specials = set(getattr(tokenizer, "all_special_tokens", []))
    specials |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    matches = [s for s in specials if s and tail.startswith(s)]
    if not matches:
        raise TemplateError(f"the chat template writes {tail[:30]!r} after an assistant message, not a special token; "
                            "pass end_of_turn= the text the model ends its turn with")
    return max(matches, key=len)


def assistant_turn_end(rendered: str, content: str, end_of_turn: str) -> int:
    """Offset in `rendered` just after the last assistant message's `content` and its `end_of_turn`.

    That is where the model's own generated text ends: everything after it (e.g. the newline
    after `<|im_end|>`) belongs to the next delta.
    """
    at = rendered.rfind(content + end_of_turn)
    if at >= 0:
        return at + len(content) + len(end_of_turn)
    at = rendered.rfind(content)
    if at < 0:
        raise TemplateError(f"the chat template alters the last assistant message: its content {content[:40]!r} "
                            "is not in the render verbatim")
    raise TemplateError(f"the chat template writes {rendered[at + len(content):][:30]!r} after the last assistant "
                        f"message, not the end-of-turn token {end_of_turn!r}")


def render_delta(
    tokenizer: Any,
    history_messages: Messages,
    new_messages: Messages,
    add_generation_prompt: bool = True,
    end_of_turn: str | None = None,
) -> str:
    """Text to append after the model's last generated token so that the conversation renders in full.

    `history_messages` ends with the assistant message the model just generated (its text up
    to and including `end_of_turn`, by default the special token the template puts after an
    assistant message). With an empty history this is the plain render of `new_messages`.
    Raises `TemplateError` if the template is not prefix-consistent for this conversation.
    """
    if not history_messages:
        return render(tokenizer, new_messages, add_generation_prompt)
    last = history_messages[-1]
    if last.get("role") != "assistant":
        raise ValueError(f"history must end with the assistant message the model generated, not a {last.get('role')!r} "
                         "message; append new observations after an assistant turn")
    eot = end_of_turn if end_of_turn is not None else detect_end_of_turn(tokenizer)
    prefix = render(tokenizer, history_messages, add_generation_prompt=False)
    cut = assistant_turn_end(prefix, last["content"], eot)
    full = render(tokenizer, [*history_messages, *new_messages], add_generation_prompt)
    if not full.startswith(prefix[:cut]):
        at = first_difference(full, prefix[:cut])
        raise TemplateError(f"the chat template is not prefix-consistent: adding {len(new_messages)} message(s) changes "
                            f"the earlier conversation at character {at}: it was {excerpt(prefix, at)}, "
                            f"it becomes {excerpt(full, at)}")
    return full[cut:]
