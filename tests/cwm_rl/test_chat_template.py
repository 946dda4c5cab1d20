"""The chat templates (ChatML and CWM's) and their incremental-rendering helpers, and `check_template` on good and
broken templates."""

from __future__ import annotations

import copy

import pytest
from typer.testing import CliRunner

from cwm_rl.cli import app
from cwm_rl.models import (
    CHAT_TEMPLATE,
    CWM_CHAT_TEMPLATE,
    TemplateError,
    check_template,
    detect_end_of_turn,
    render,
    render_delta,
)
from cwm_rl.models.tokenizer import train_tokenizer

THINK_ANSWER = "<think>\n2 + 3 = 5\n</think>\nThe answer is \\boxed{5}."
FIRST = [{"role": "system", "content": "Solve."}, {"role": "user", "content": "What is 2 + 3?"}]

# Like Qwen3's template: drops <think> ... </think> from assistant turns before the last user message.
STRIPS_PAST_REASONING = """{{- bos_token }}
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
    {%- set content = m['content'] %}
    {%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}
        {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
    {{- '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
BOS_ONLY_WITH_GENERATION_PROMPT = CHAT_TEMPLATE.replace(
    "{{- bos_token }}", "{%- if add_generation_prompt %}{{- bos_token }}{%- endif %}")
TRIMS_CONTENT = CHAT_TEMPLATE.replace("message['content'] +", "message['content'] | trim +")
# "role: content": the generation prompt ends with a space that BPE would merge into the answer's first word.
SPACE_BEFORE_CONTENT = (CHAT_TEMPLATE.replace("message['role'] + '\\n' +", "message['role'] + ': ' +")
                        .replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant: '"))
# Llama-3-style headers and end-of-turn token (content not trimmed), on our tokenizer with those tokens added.
LLAMA3_STYLE = """{{- bos_token }}
{%- for m in messages %}
    {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def cwm_tokenizer():
    return train_tokenizer(kind="cwm")


def with_template(tokenizer, template: str):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_render_is_chatml_with_one_bos(tokenizer):
    text = render(tokenizer, [*FIRST, {"role": "assistant", "content": "5"}, {"role": "tool", "content": "ok"}],
                  add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|im_start|>system\nSolve.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                    "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>tool\nok<|im_end|>\n<|im_start|>assistant\n")
    assert render(tokenizer, FIRST) + "<|im_start|>assistant\n" == render(tokenizer, FIRST, add_generation_prompt=True)


def test_render_rejects_unknown_roles(tokenizer):
    with pytest.raises(Exception, match="unknown role narrator"):
        render(tokenizer, [{"role": "narrator", "content": "x"}])


def test_render_delta_starts_after_the_end_of_turn_token(tokenizer):
    history = [*FIRST, {"role": "assistant", "content": THINK_ANSWER}]
    new = [{"role": "user", "content": "And 3 + 4?"}]
    assert detect_end_of_turn(tokenizer) == "<|im_end|>"
    delta = render_delta(tokenizer, history, new)
    assert delta == "\n<|im_start|>user\nAnd 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    generated = THINK_ANSWER + "<|im_end|>"
    assert render(tokenizer, FIRST, True) + generated + delta == render(tokenizer, history + new, True)
    # Token-in/token-out: the pieces' tokens concatenate to the full render's tokens.
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    pieces = encode(render(tokenizer, FIRST, True)) + encode(generated) + encode(delta)
    assert pieces == encode(render(tokenizer, history + new, True))
    # The episode's end: only the newline after the end-of-turn token is left.
    assert render_delta(tokenizer, history, [], add_generation_prompt=False) == "\n"


def test_render_delta_with_no_history_is_the_first_render(tokenizer):
    assert render_delta(tokenizer, [], FIRST) == render(tokenizer, FIRST, add_generation_prompt=True)


def test_render_delta_needs_history_ending_with_the_assistant(tokenizer):
    with pytest.raises(ValueError, match="must end with the assistant message"):
        render_delta(tokenizer, FIRST, [{"role": "user", "content": "x"}])


def test_render_delta_refuses_a_template_that_rewrites_history(tokenizer):
    tok = with_template(tokenizer, STRIPS_PAST_REASONING)
    with pytest.raises(TemplateError, match="not prefix-consistent.*character"):
        render_delta(tok, [*FIRST, {"role": "assistant", "content": THINK_ANSWER}], [{"role": "user", "content": "more"}])


def test_our_template_passes(tokenizer):
    assert check_template(tokenizer) == []


def test_stripping_past_reasoning_fails_naming_the_turn(tokenizer):
    problems = check_template(with_template(tokenizer, STRIPS_PAST_REASONING))
    text = "\n".join(problems)
    assert "conversation 'math-think', turn 1 (messages 2-3: assistant, user): the chat template is not prefix-consistent" in text
    assert "conversation 'math-think', message 2 (assistant): past reasoning (<think>) is stripped" in text


def test_bos_only_with_generation_prompt_fails_naming_the_turn(tokenizer):
    problems = check_template(with_template(tokenizer, BOS_ONLY_WITH_GENERATION_PROMPT))
    assert any("'echo-no-system', turn 1" in p and "not prefix-consistent" in p and "<|begin_of_text|>" in p for p in problems), problems


def test_trimming_content_fails(tokenizer):
    problems = check_template(with_template(tokenizer, TRIMS_CONTENT))
    assert any("'math-think', turn 2" in p and "alters the last assistant message" in p for p in problems), problems
    assert any("'echo-no-system', turn 2" in p and "incremental rendering differs" in p for p in problems), problems


def test_token_boundary_merge_is_caught(tokenizer):
    assert tokenizer.tokenize(" apple") == ["Ġapple"]  # so ": " + "apple" tokenises differently from ": apple"
    problems = check_template(with_template(tokenizer, SPACE_BEFORE_CONTENT))
    echo = [p for p in problems if "'echo-no-system', turn 1 (messages 1-2: assistant, user)" in p]
    assert len(echo) == 1, problems
    assert "incremental tokenisation differs from tokenising the full rendering at token" in echo[0]
    assert "['Ġ', 'apple'" in echo[0] and "['Ġapple'" in echo[0]


def test_other_tokenizers_templates_work(tokenizer):
    tok = with_template(tokenizer, LLAMA3_STYLE)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    assert detect_end_of_turn(tok) == "<|eot_id|>"
    history = [*FIRST, {"role": "assistant", "content": "5"}]
    assert render_delta(tok, history, [{"role": "user", "content": "ok"}]) == (
        "<|start_header_id|>user<|end_header_id|>\n\nok<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert check_template(tok) == []


def test_no_chat_template_is_a_problem(tokenizer):
    assert check_template(with_template(tokenizer, None)) == ["the tokenizer has no chat template"]


def test_check_template_command(tokenizer, tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    tokenizer.save_pretrained(good)
    with_template(tokenizer, STRIPS_PAST_REASONING).save_pretrained(bad)
    runner = CliRunner()
    r = runner.invoke(app, ["model", "check-template", str(good)])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "template OK"
    r = runner.invoke(app, ["model", "check-template", str(bad)])
    assert r.exit_code == 1, r.output
    assert "problem(s) with the chat template" in r.output and "turn 1 (messages 2-3: assistant, user)" in r.output


def test_cwm_template_writes_headers_tool_names_and_one_bos(cwm_tokenizer):
    messages = [*FIRST, {"role": "assistant", "content": THINK_ANSWER}, {"role": "tool", "name": "bash", "content": "ok\n"},
                {"role": "tool", "content": "no name"}]
    assert render(cwm_tokenizer, messages, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSolve.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{THINK_ANSWER}<|eot_id|>"
        "<|start_header_id|>tool: bash<|end_header_id|>\n\nok\n<|eot_id|>"
        "<|start_header_id|>tool<|end_header_id|>\n\nno name<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert cwm_tokenizer.chat_template == CWM_CHAT_TEMPLATE
    with pytest.raises(Exception, match="unknown role raw: use system, user, assistant or tool"):
        render(cwm_tokenizer, [{"role": "raw", "content": "x"}])


def test_cwm_render_delta_after_eot_with_a_named_tool(cwm_tokenizer):
    assert detect_end_of_turn(cwm_tokenizer) == "<|eot_id|>"
    history = [*FIRST, {"role": "assistant", "content": "<tool: bash>\nls\n</tool>"}]
    new = [{"role": "tool", "name": "bash", "content": "<output>\nsetup.py\n</output>"}]
    delta = render_delta(cwm_tokenizer, history, new)
    assert delta == ("<|start_header_id|>tool: bash<|end_header_id|>\n\n<output>\nsetup.py\n</output><|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n")
    encode = lambda s: cwm_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    generated = history[-1]["content"] + "<|eot_id|>"
    pieces = encode(render(cwm_tokenizer, FIRST, True)) + encode(generated) + encode(delta)
    assert pieces == encode(render(cwm_tokenizer, history + new, True))
    assert render_delta(cwm_tokenizer, history, [], add_generation_prompt=False) == ""  # nothing after <|eot_id|>


def test_cwm_template_passes_and_trimming_fails(cwm_tokenizer):
    assert check_template(cwm_tokenizer) == []
    # CWM's own tokenizer strips message bodies; a template doing that breaks token-in/token-out rollouts.
    trims = with_template(cwm_tokenizer, CWM_CHAT_TEMPLATE.replace("message['content'] +", "message['content'] | trim +"))
    problems = check_template(trims)
    assert any("'math-think', turn 2" in p and "alters the last assistant message" in p for p in problems), problems
    assert any("'echo-no-system', turn 2" in p and "incremental rendering differs" in p for p in problems), problems
