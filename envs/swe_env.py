"""`cwm_rl/SWE-v0`: resolve a GitHub-style issue in a repository in Docker, judged by hidden tests.

An episode gets its own container of the task's image (from a warm pool, `envs.swe.containers`)
with the repository at its base commit in /testbed. Each turn the model uses one tool
(`envs.swe.tools`: bash in a persistent shell, edit, create, submit); every observation the model
answers ends with a budget notice: the turns left, and the tokens left of `token_budget`. The env sees
text, not the worker's tokens: it counts the tokens of every message's content and every reply with
`tokenizer` (a model directory or Hugging Face name, loaded with transformers) when one is given, else
estimates 4 characters a token; the chat template's headers and the notices themselves are not
counted, so the worker's `max_total_tokens` stays the exact bound. Counted the same way, a replay
gets the same notices.

`format` says how observations are written. `text` (the default): the tool's result as it is, then
`[budget: 27 turns left, about 31000 tokens left]`. `cwm`, CWM's SWE-RL format: a `tool` message
named after the tool (`name`, which CWM's chat template writes as the header `tool: bash`) holding
`<output>`...`</output>` and a `<budget>` block; a malformed turn gets a `user` message
`FormatError: ...` as CWM's env sends (no tool ran); the call is read after the reply's one `</think>`.

`submit` ends the episode: the diff against the base commit is graded in a FRESH container
(`envs.swe.grading`): reward `correct_reward` (+1) when every FAIL_TO_PASS and PASS_TO_PASS test
passes, else `wrong_reward` (-1), plus `gold_similarity` x the similarity of the patch to the
gold one (0 by default). An episode that runs out of turns or passes `episode_timeout_s` without
a submission gets `wrong_reward` and is truncated; with `submit_at_end=True` its diff as it stands
at the last turn is submitted and graded instead. A malformed call (none, two, an unknown tool, an
unclosed one) gets an error observation (`malformed="error"`) or ends the episode with `wrong_reward`
(`malformed="end"`). The submit's observation is the episode's last; in the cwm format it quotes the
patch in `<submission>` (CWM lets the model revise after that; here, as in the text format, submit ends
the episode).

Tasks: `tasks_path` (SWE-bench JSONL, `envs.swe.tasks`), by default the three repositories shipped
in `envs/swe/data`. Images are built offline on first use (`cwm-rl swe build-base`, `swe validate`).
"""

from __future__ import annotations

import functools
import os
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cwm_rl.types import Task
from envs.base import TextEnv
from envs.sandbox.base import SandboxError
from envs.swe.tasks import SHIPPED_TASKS, SWEInstance, load_tasks
from envs.swe.tools import (CWM_ISSUE_PROMPT, CWM_TOOLS_PROMPT, FORMATS, TOOLS_PROMPT, after_reasoning, apply_edit, cwm_budget,
                            cwm_output, cwm_submission, parse_create, parse_edit, parse_tool_call)

CHARS_PER_TOKEN = 4
EPISODES_IN_FLIGHT_VAR = "CWM_RL_EPISODES_IN_FLIGHT"
EXCLUDE = ("':(exclude,glob)**/__pycache__/**'", "':(exclude,glob)**/.pytest_cache/**'")


def pool_sizes(pool_size: int | None, max_containers: int | None) -> dict[str, int]:
    """The container pool's warm size and cap. Unset, they follow the job: `$CWM_RL_EPISODES_IN_FLIGHT` (the
    episodes this process plays at once, set by `cwm-rl train`) gets a container each plus a warm pool, so no
    episode and no grading run waits for a slot; outside a job, 2 warm and 16 at most."""
    in_flight = int(os.environ.get(EPISODES_IN_FLIGHT_VAR) or 0)
    if pool_size is None:
        pool_size = min(max(in_flight // 2, 2), 8) if in_flight else 2
    if max_containers is None:
        max_containers = in_flight + pool_size if in_flight else 16
    return {"pool_size": pool_size, "max_containers": max_containers}


@functools.lru_cache(maxsize=4)
def token_counter(tokenizer: str) -> Callable[[str], int]:
    """Counts a text's tokens with this tokenizer, loaded once per process (every episode's env shares it);
    behind a lock, as env steps run in threads and a fast tokenizer used by two at once can fail ("Already borrowed")."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tokenizer)
    lock = threading.Lock()

    def count(text: str) -> int:
        with lock:
            return len(loaded.encode(text, add_special_tokens=False))

    return count


class SWEEnv(TextEnv):
    # What `cwm-rl rollouts replay` may find different in a faithful replay (field -> why).
    replay_may_differ = {"reset.info.session_id": "every episode gets a container session of its own",
                         "info.test_log_tail": "pytest's report ends with its own run time"}

    def __init__(
        self,
        tasks_path: str | Path | None = None,
        instance_ids: list[str] | None = None,
        max_turns: int = 30,
        episode_timeout_s: float = 1800.0,
        command_timeout_s: float = 30.0,
        output_chars: int = 8000,
        token_budget: int = 32768,
        malformed: str = "error",
        correct_reward: float = 1.0,
        wrong_reward: float = -1.0,
        gold_similarity: float = 0.0,
        test_timeout_s: float = 120.0,
        pool_size: int | None = None,
        max_containers: int | None = None,
        memory_mb: int = 2048,
        submit_at_end: bool = False,
        format: str = "text",
        tokenizer: str | None = None,
        **kwargs: Any,
    ):
        if format not in FORMATS:
            raise ValueError(f"format must be 'text' (results as they are, a [budget: ...] line) or 'cwm' (CWM's <output> and "
                             f"<budget> in tool messages named after the tool), got {format!r}")
        if malformed not in ("error", "end"):
            raise ValueError(f"malformed must be 'error' (an error observation) or 'end' (end the episode), got {malformed!r}")
        if correct_reward <= wrong_reward:
            raise ValueError(f"correct_reward ({correct_reward}) must exceed wrong_reward ({wrong_reward})")
        if command_timeout_s <= 0 or episode_timeout_s <= 0 or output_chars < 100:
            raise ValueError("command_timeout_s and episode_timeout_s must be > 0 and output_chars >= 100")
        super().__init__(max_turns=max_turns, **kwargs)
        self.tasks = load_tasks(tasks_path or SHIPPED_TASKS)
        if instance_ids is not None:
            unknown = set(instance_ids) - {t.id for t in self.tasks}
            if unknown:
                raise ValueError(f"unknown instance_ids {sorted(unknown)}; the tasks file has {[t.id for t in self.tasks][:10]}")
            self.tasks = [t for t in self.tasks if t.id in set(instance_ids)]
        self.episode_timeout_s, self.command_timeout_s, self.output_chars = episode_timeout_s, command_timeout_s, output_chars
        self.token_budget, self.malformed, self.gold_similarity = token_budget, malformed, gold_similarity
        self.correct_reward, self.wrong_reward, self.test_timeout_s = correct_reward, wrong_reward, test_timeout_s
        self.pool_settings = {**pool_sizes(pool_size, max_containers), "memory_mb": memory_mb}
        self.submit_at_end, self.format = submit_at_end, format
        self.count_tokens = self._token_counter(tokenizer)
        self.container = self.shell = None
        self.instance: SWEInstance | None = None

    @staticmethod
    def _token_counter(tokenizer: str | None) -> Callable[[str], int]:
        if tokenizer is None:
            return lambda text: len(text) // CHARS_PER_TOKEN
        try:
            return token_counter(str(tokenizer))
        except Exception as e:  # transformers missing, no such directory or model name
            raise ValueError(f"could not load the tokenizer {tokenizer!r} ({type(e).__name__}: {e}); pass a model directory "
                             "with tokenizer files, or leave tokenizer unset to estimate 4 characters a token") from None

    # -- the episode's container ---------------------------------------------------------------
    def _pool(self):
        from envs.sandbox.base import Limits
        from envs.swe.containers import SWE_LIMITS, shared_pool

        s = self.pool_settings
        limits = Limits(**{**SWE_LIMITS.model_dump(), "memory_mb": s["memory_mb"]})
        return shared_pool(limits=limits, pool_size=s["pool_size"], max_containers=s["max_containers"])

    def _image(self) -> str:
        from envs.swe.images import task_image

        return task_image(self.instance, self._pool().client)

    def _release(self) -> None:
        if self.shell is not None:
            self.shell.close()
        if self.container is not None:
            self.container.release()
        self.container = self.shell = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._release()
        observation, info = super().reset(seed=seed, options=options)
        self.instance = SWEInstance.from_task(self.task)
        self.container = self._pool().acquire(self._image(), self.instance.workdir)
        self.shell = self.container.shell(self.command_timeout_s)
        base, status, _ = self.shell.run("git rev-parse HEAD", timeout_s=30)
        self.base_commit = base.strip() if status == 0 else self.instance.base_commit
        self.started = time.monotonic()
        self.tokens_used = self.count_tokens("".join(m["content"] for m in observation))  # one count: the estimate rounds once, as it always did
        self.submitted_patch: str | None = None
        return observation, {**info, "session_id": self.container.session_id}

    def first_messages(self, task: Task) -> list[dict[str, str]]:
        turns = f"{self.max_turns} turns" if self.max_turns else "unlimited turns"
        workdir = SWEInstance.from_task(task).workdir
        if self.format == "cwm":
            system = CWM_TOOLS_PROMPT.format(workdir=workdir, turns=turns, tokens=self.token_budget, timeout=self.command_timeout_s)
            return [{"role": "system", "content": system},
                    {"role": "user", "content": CWM_ISSUE_PROMPT.format(issue=task.prompt.strip())}]
        return [{"role": "system", "content": TOOLS_PROMPT.format(workdir=workdir, timeout=self.command_timeout_s)},
                {"role": "user", "content": f"<issue>\n{task.prompt.strip()}\n</issue>\n\n[budget: {turns}, about "
                                            f"{self.token_budget} tokens]"}]

    # -- a turn ----------------------------------------------------------------------------------
    def respond(self, action: str):
        self.tokens_used += self.count_tokens(action)
        if time.monotonic() - self.started > self.episode_timeout_s:
            return self._end_unsubmitted(f"the episode passed its {self.episode_timeout_s:g} s deadline", truncated=True)
        reply, error = after_reasoning(action) if self.format == "cwm" else (action, None)
        call, error = parse_tool_call(reply) if error is None else (None, error)
        info: dict[str, Any] = {"tool": call.name if call else None, "tool_error": error}
        if call is not None and call.name == "submit":
            return self._submit()
        if call is not None:
            try:
                message = self._tool_message(call.name, self._run_tool(call.name, call.body))
            except ValueError as e:
                message, info["tool_error"] = self._tool_message(call.name, f"error: {e}"), str(e)
            except SandboxError as e:  # the agent stopped its own container (e.g. killed everything as root)
                self._release()
                return [self._tool_message(call.name, f"episode over: {e}")], self.wrong_reward, True, False, {**info, "reason": str(e)}
        else:
            message = self._turn_message(f"FormatError: {error}" if self.format == "cwm" else f"error: {error}")
            if self.malformed == "end":
                self._release()
                return [message], self.wrong_reward, True, False, {**info, "reason": "malformed tool call"}
        last_turn = self.max_turns is not None and self.num_turns + 1 >= self.max_turns
        if last_turn and self.submit_at_end:  # out of turns: the diff as it stands is graded
            return self._submit()
        if last_turn:
            self._release()
            return [message], self.wrong_reward, False, False, {**info, "reason": "no submission within max_turns"}
        return [self._with_budget_notice(message)], 0.0, False, False, info

    def _tool_message(self, tool: str, text: str) -> dict[str, str]:
        """What a tool that ran answers, in the episode's format."""
        if self.format == "cwm":
            return {"role": "tool", "name": tool, "content": cwm_output(text)}
        return {"role": "tool", "content": text}

    def _turn_message(self, text: str) -> dict[str, str]:
        """What the env says about a turn no tool ran for (a malformed call, the deadline); CWM's env says it
        as the user, there being no tool to name."""
        return {"role": "user" if self.format == "cwm" else "tool", "content": text}

    def _with_budget_notice(self, message: dict[str, str]) -> dict[str, str]:
        """A message the model answers, counted, with the turns and tokens left after it. In the cwm format only
        a tool's result gets one: CWM's env sends a format error as the bare user message."""
        self.tokens_used += self.count_tokens(message["content"])
        turns_left = None if self.max_turns is None else self.max_turns - self.num_turns - 1
        tokens_left = max(self.token_budget - self.tokens_used, 0)
        if self.format == "text":
            turns = "" if turns_left is None else f"{turns_left} turns left, "
            notice = f"[budget: {turns}about {tokens_left} tokens left]"
        elif message["role"] == "tool":
            notice = cwm_budget(turns_left, tokens_left)
        else:
            return message
        return {**message, "content": f"{message['content']}\n\n{notice}"}

    def _run_tool(self, name: str, body: str) -> str:
        if name == "bash":
            if not body.strip():
                raise ValueError("the bash call is empty: put a command between <tool: bash> and </tool>")
            output, status, notes = self.shell.run(body, self.command_timeout_s)  # SandboxError: the container is gone
            return self._clip(output) + "".join(f"\n[{note}]" for note in ([f"exit status {status}"] if status else []) + notes)
        if name == "create":
            path, content = parse_create(body)
            written = self.container.write_file(self._path(path), content.encode())
            if written.exit_code != 0:
                raise ValueError(f"could not write {path}: {written.stderr.decode(errors='replace').strip()[-300:]}")
            return f"created {path} ({len(content.splitlines())} lines)"
        path, blocks = parse_edit(body)
        read = self.container.read_file(self._path(path))
        if read.exit_code != 0:
            raise ValueError(f"cannot read {path}: {read.stderr.decode(errors='replace').strip()[-300:]} (create makes new files)")
        text = read.stdout.decode(errors="replace")
        updated = apply_edit(text, blocks)
        written = self.container.write_file(self._path(path), updated.encode())
        if written.exit_code != 0:
            raise ValueError(f"could not write {path}: {written.stderr.decode(errors='replace').strip()[-300:]}")
        first = updated.find(blocks[0][1]) if blocks[0][1] else text.find(blocks[0][0])
        line = updated.count("\n", 0, max(first, 0)) + 1
        return f"edited {path}: {len(blocks)} block(s) replaced, the first at line {line}"

    def _path(self, path: str) -> str:
        return path if path.startswith("/") else f"{self.instance.workdir}/{path}"

    def _clip(self, text: str) -> str:
        if len(text) <= self.output_chars:
            return text
        half = self.output_chars // 2
        return f"{text[:half]}\n...[{len(text) - 2 * half} characters cut]...\n{text[-half:]}"

    def diff(self) -> str:
        """The episode's changes against the base commit (new files included), as a git patch; taken in the
        repository's root whatever the shell's cwd, with git's external diff and text conversion off.
        ValueError when git cannot take it (the agent broke the repository)."""
        command = (f"git add -A -- . {' '.join(EXCLUDE)} && git diff --cached --no-color --binary --no-ext-diff --no-textconv "
                   f"{shlex.quote(self.base_commit)}")
        done = self.container.exec(["sh", "-c", command], timeout_s=60, output_bytes=16 << 20)
        output = done.stdout.decode(errors="replace")
        if done.exit_code != 0:
            raise ValueError(f"git could not take the diff (exit {done.exit_code}): {done.stderr.decode(errors='replace')[-300:]}")
        return output

    def _submit(self):
        from envs.swe.grading import grade_patch
        from rewards.swe import patch_similarity

        try:
            patch = self.diff()
        except ValueError as e:
            self._release()
            return ([self._tool_message("submit", f"submitted: not resolved ({e})")], self.wrong_reward, True, False,
                    {"tool": "submit", "resolved": False, "grading_error": str(e), "patch": None})
        self.submitted_patch = patch
        self._release()
        grade = grade_patch(self._pool(), self._image(), self.instance, patch, timeout_s=self.test_timeout_s)
        reward = self.correct_reward if grade.resolved else self.wrong_reward
        similarity = patch_similarity(patch, self.instance.patch) if self.instance.patch else None
        if self.gold_similarity and similarity is not None:
            reward += self.gold_similarity * similarity
        info = {"tool": "submit", "patch": patch, "gold_similarity": similarity, **grade.as_info()}
        verdict = "submitted: " + ("resolved" if grade.resolved else f"not resolved ({len(grade.failing)} hidden test(s) failing)")
        text = cwm_submission(self._clip(patch), verdict) if self.format == "cwm" else verdict
        return [self._tool_message("submit", text)], reward, True, False, info

    def _end_unsubmitted(self, why: str, truncated: bool):
        self._release()
        return [self._turn_message(f"episode over: {why}")], self.wrong_reward, False, truncated, {"reason": why}

    # -- checks and SFT ----------------------------------------------------------------------------
    def reference_action(self) -> str | None:
        """Apply the gold patch with one bash call, then submit."""
        if self.instance is None or not self.instance.patch:
            return None
        if self.num_turns == 0:
            return f"<tool: bash>\ngit apply <<'CWM_RL_GOLD_PATCH'\n{self.instance.patch.rstrip()}\nCWM_RL_GOLD_PATCH\n</tool>"
        return "<tool: submit>\n</tool>"

    def reward_hack_probes(self) -> dict[str, str]:
        """One-turn probes (`cwm-rl env check`); multi-turn hacks (a conftest hook, a forged report) are in the tests."""
        return {"submit_nothing": "<tool: submit>\n</tool>"}

    def state(self) -> dict[str, Any]:
        return {**super().state(), "session_id": self.container.session_id if self.container else None,
                "tokens_used_estimate": getattr(self, "tokens_used", 0), "submitted_patch": getattr(self, "submitted_patch", None)}

    def close(self) -> None:
        self._release()
        super().close()
