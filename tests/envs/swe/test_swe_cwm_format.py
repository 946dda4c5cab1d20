"""`cwm_rl/SWE-v0` in CWM's own format (`format="cwm"`), without Docker: the rendering and parsing, and
turns played against a stand-in container whose shell echoes. (A real episode is in test_swe_docker.py.)"""

from __future__ import annotations

import pytest

from envs.swe.tools import after_reasoning, cwm_budget, cwm_output, cwm_submission, parse_tool_call
from envs.swe_env import SWEEnv


def test_cwm_blocks_are_written_as_cwm_writes_them():
    assert cwm_output("1 passed") == "<output>\n1 passed\n</output>"
    assert cwm_budget(4, 31000) == "<budget>\n* Remaining turns: 4\n* Remaining tokens: 31000\n</budget>"
    assert cwm_budget(None, 7) == "<budget>\n* Remaining turns: unlimited\n* Remaining tokens: 7\n</budget>"
    quoted = cwm_submission("diff --git a/x b/x", "submitted: resolved")
    assert quoted.endswith(":\n\n<submission>\ndiff --git a/x b/x\n</submission>\n\nsubmitted: resolved")
    assert cwm_output("ran\n") == "<output>\nran\n</output>"  # the output's own last newline is the one before </output>


def test_the_call_is_read_after_the_one_think_block():
    thought = "<think>\nMaybe <tool: bash>\nrm -rf .\n</tool>? No.\n</think>\n"
    reply, error = after_reasoning(thought + "<tool: bash>\nls\n</tool>")
    assert error is None and parse_tool_call(reply)[0].body == "ls\n"  # the call it only thought about does not count
    assert parse_tool_call(after_reasoning(thought + "no call")[0])[1].startswith("no tool call")
    assert after_reasoning("<tool: bash>\nls\n</tool>") == ("<tool: bash>\nls\n</tool>", None)  # reasoning is optional
    assert "one </think> per turn" in after_reasoning("a</think>b</think><tool: bash>\nls\n</tool>")[1]
    # a </think> in a call's body is the body's text (an edit of a file that holds one), with or without reasoning
    edit = '<tool: edit>\na.py\n<<<<<<< SEARCH\nx = "</think>"\n=======\nx = 1\n>>>>>>> REPLACE\n</tool>'
    assert after_reasoning(edit) == (edit, None) and after_reasoning(thought + edit) == ("\n" + edit, None)
    mentioned = "<think>I could use <tool: bash> here</think>\n<tool: bash>\nls\n</tool>"  # an opener only named in thought
    assert parse_tool_call(after_reasoning(mentioned)[0])[0].body == "ls\n"


def test_an_unknown_format_or_tokenizer_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"format must be 'text' .* or 'cwm' .*got 'xml'"):
        SWEEnv(format="xml")
    with pytest.raises(ValueError, match="could not load the tokenizer .*leave tokenizer unset"):
        SWEEnv(tokenizer=str(tmp_path / "no-model"))


class EchoShell:
    def run(self, command, timeout_s=None):
        return f"ran: {command.strip()}\n", 0, []

    def close(self):
        pass


class StandInContainer:
    session_id = "stand-in"

    def shell(self, timeout_s=60.0):
        return EchoShell()

    def release(self):
        pass


class StandInPool:
    def acquire(self, image, workdir=None):
        return StandInContainer()


def _env(**kwargs) -> SWEEnv:
    env = SWEEnv(instance_ids=["cwm-rl__minicalc-1"], **kwargs)
    env._pool, env._image = StandInPool, lambda: "stand-in"  # bash runs nowhere: the shell echoes the command
    return env


def test_cwm_turns_count_tokens_exactly_and_say_so(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    env = _env(format="cwm", tokenizer=str(tiny_model), max_turns=5, token_budget=5000)
    first, _ = env.reset(seed=0)
    system, user = first
    assert system["content"].startswith("You are a helpful AI assistant.\n\n# Environment\n")
    assert all(s in system["content"] for s in ("<tool: bash>", "<tool: submit>", "<output>", "<budget>", "5 turns", "5000 tokens"))
    assert "<issue_description>\n" in user["content"] and "Chained subtraction" in user["content"]
    used = count(system["content"]) + count(user["content"])

    action = "<think>\nLook first.\n</think>\n<tool: bash>\nls minicalc\n</tool>"
    observation, reward, terminated, truncated, info = env.step(action)
    output = "<output>\nran: ls minicalc\n</output>"
    used += count(action) + count(output)
    assert observation == [{"role": "tool", "name": "bash", "content": f"{output}\n\n<budget>\n* Remaining turns: 4\n"
                                                                      f"* Remaining tokens: {5000 - used}\n</budget>"}]
    assert (reward, terminated, truncated, info["tool"]) == (0.0, False, False, "bash")

    two_calls = "<tool: bash>\nls\n</tool>\n<tool: bash>\npwd\n</tool>"
    observation, reward, terminated, _, info = env.step(two_calls)
    error = "FormatError: one tool call per turn, got 2 `<tool:` openers"
    assert observation == [{"role": "user", "content": error}]  # as CWM's env answers a format error: no tool, no budget
    assert (reward, terminated) == (0.0, False) and info["tool_error"] and info["tool"] is None
    used += count(two_calls) + count(error)

    edit = "<tool: edit>\nminicalc/parser.py\nno SEARCH block\n</tool>"
    observation, *_ = env.step(edit)
    output = "<output>\nerror: an edit needs a block: <<<<<<< SEARCH, the old lines, =======, the new lines, >>>>>>> REPLACE\n</output>"
    used += count(edit) + count(output)
    assert observation[0]["name"] == "edit" and observation[0]["content"] == (
        f"{output}\n\n<budget>\n* Remaining turns: 2\n* Remaining tokens: {5000 - used}\n</budget>")
    assert env.state()["tokens_used_estimate"] == used
    env.close()


def test_without_a_tokenizer_the_budget_is_estimated_and_the_text_format_is_unchanged():
    env = _env(format="cwm", max_turns=3, token_budget=1000, malformed="end")
    first, _ = env.reset(seed=0)
    observation, *_ = env.step("<tool: bash>\npwd\n</tool>")
    used = (sum(len(m["content"]) for m in first) // 4 + len("<tool: bash>\npwd\n</tool>") // 4
            + len("<output>\nran: pwd\n</output>") // 4)
    assert observation[0]["content"].endswith(f"* Remaining tokens: {1000 - used}\n</budget>")
    observation, reward, terminated, *_ = env.step("no call")  # malformed="end": the format error ends the episode
    assert observation[0]["role"] == "user" and observation[0]["content"].startswith("FormatError: no tool call")
    assert (reward, terminated) == (-1.0, True)
    text = _env(max_turns=3)
    first, _ = text.reset(seed=0)
    assert first[-1]["content"].startswith("<issue>\n") and "[budget: 3 turns" in first[-1]["content"]
    action = "a</think>b</think>\n<tool: bash>\npwd\n</tool>"
    observation, *_ = text.step(action)  # the text format has no think rule
    # the text format's count as it always was: the first messages' characters // 4, then each piece's
    used = sum(len(m["content"]) for m in first) // 4 + len(action) // 4 + len("ran: pwd\n") // 4
    assert observation == [{"role": "tool", "content": f"ran: pwd\n\n\n[budget: 2 turns left, about "
                                                       f"{text.token_budget - used} tokens left]"}]
    env.close()
    text.close()
