"""`cwm_rl/SWE-v0` on real Docker: images built offline, the shipped tasks validated, episodes played
in-process and through a real env server over HTTP, hostile commands contained, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from envs.sandbox.base import SandboxError
from envs.swe.tasks import SHIPPED_TASKS, SWEInstance, load_tasks
from envs.swe.tools import cwm_output, cwm_submission
from envs.swe_env import SWEEnv

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]
CLI = [sys.executable, "-m", "cwm_rl.cli"]


@pytest.fixture(scope="module")
def pool(sandbox_root, docker_ready):
    from envs.swe.containers import SWE_LIMITS, ContainerPool

    limits = SWE_LIMITS.model_copy(update={"memory_mb": 512, "processes": 64})
    pool = ContainerPool(limits=limits, pool_size=1, max_containers=8, run_id="pytest-swe")
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def minicalc(pool):
    from envs.swe.images import task_image

    instance = next(SWEInstance.from_task(t) for t in load_tasks() if t.id == "cwm-rl__minicalc-1")
    return instance, task_image(instance, pool.client)


def _make_env(**kwargs):
    from envs.registry import make_env

    return make_env("cwm_rl/SWE-v0", **{"instance_ids": ["cwm-rl__minicalc-1"], "command_timeout_s": 5, "memory_mb": 512,
                                         "pool_size": 1, **kwargs})


def _containers(label: str) -> list[str]:
    return subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"], capture_output=True, text=True).stdout.split()


def test_build_base_and_validate_the_shipped_tasks(sandbox_root, docker_ready):
    base = subprocess.run(CLI + ["swe", "build-base"], capture_output=True, text=True, cwd=REPO)
    assert base.returncode == 0, base.stderr
    tag = base.stdout.strip()
    assert tag.startswith("cwm-rl/sandbox-base:") and subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0
    done = subprocess.run(CLI + ["swe", "validate", "--json", "--jobs", "2"], capture_output=True, text=True, cwd=REPO, timeout=600)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(r["instance_id"] for r in rows) == sorted(t.id for t in load_tasks())
    assert all(r["ok"] and r["gold_resolved"] and not r["empty_resolved"] for r in rows), rows


def test_validate_reports_a_broken_instance(tmp_path, sandbox_root, docker_ready):
    row = json.loads(SHIPPED_TASKS.read_text().splitlines()[0])
    row["repo_dir"] = str(SHIPPED_TASKS.parent / row["repo_dir"])
    row["FAIL_TO_PASS"] = row["PASS_TO_PASS"][:1]  # passes without the fix: not a valid instance
    row["patch"] = row["patch"].replace("+", "+#", 3)  # and a gold patch that no longer fixes anything
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(row) + "\n")
    done = subprocess.run(CLI + ["swe", "validate", str(path), "--json"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 1
    problem = json.loads(done.stdout.splitlines()[0])["problem"]
    assert "FAIL_TO_PASS tests pass without a fix" in problem or "resolves it" in problem, problem


def test_task_image_holds_only_the_base_commit(tmp_path, pool):
    """A repo_dir that is a git repository with later commits, a tag, a remote and a second branch."""
    from envs.swe.images import task_image

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "m.py").write_text("X = 1\n")
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "base"], check=True)
    base = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / "m.py").write_text("X = 2  # the future fix\n")
    subprocess.run(git + ["commit", "-qam", "fix"], check=True)
    subprocess.run(git + ["tag", "v1"], check=True)
    subprocess.run(git + ["branch", "other"], check=True)
    subprocess.run(git + ["remote", "add", "origin", "https://example.invalid/x.git"], check=True)
    instance = SWEInstance(instance_id=f"hygiene-{uuid.uuid4().hex[:6]}", base_commit=base, problem_statement="p",
                           test_patch="x", FAIL_TO_PASS=["t.py::t"], repo_dir=str(repo))
    image = task_image(instance, pool.client)
    container = pool.acquire(image)
    try:
        shell = container.shell()
        out, status, _ = shell.run("git rev-parse HEAD; git rev-list --all | wc -l; git branch -a | wc -l; git tag | wc -l; "
                                   "git remote | wc -l; git reflog | wc -l; cat m.py; git log --all --oneline | grep -c fix; true")
        shell.close()
    finally:
        container.release()
        pool.client.images.remove(image, force=True)
    assert status == 0 and out.split() == [base, "1", "1", "0", "0", "0", "X", "=", "1", "0"], out


LIVE = "ps -e -o stat=,comm= | awk '$1 !~ /^Z/ {print $2}'"  # the commands of live processes (a killed one may linger as a zombie)


def test_bash_session_persists_and_survives_timeouts_exits_and_floods(pool, minicalc):
    _, image = minicalc
    container = pool.acquire(image)
    try:
        shell = container.shell(timeout_s=3)
        assert shell.run("cd minicalc && export X=7 && f() { echo fn; }")[1] == 0
        out, status, notes = shell.run("pwd; echo $X; f; false")
        assert out.split() == ["/testbed/minicalc", "7", "fn"] and status == 1 and not notes
        started = time.monotonic()
        out, status, notes = shell.run("sleep 60 & sleep 60; echo never")  # the background sleep dies too
        assert status is None and notes and notes[0].startswith("timeout") and time.monotonic() - started < 20
        out, status, _ = shell.run(f"pwd; {LIVE} | grep -c '^sleep$'")
        # cwd kept; only the container's keeper sleeps (bash may first report the killed background job)
        assert out.splitlines()[-2:] == ["/testbed/minicalc", "1"] and status == 0, out
        out, status, notes = shell.run("head -c 50000000 /dev/zero | tr '\\0' y")
        assert status is None and "output limit" in notes[0] and len(out) < 5 << 20
        out, status, notes = shell.run("while :; do :; done")  # the shell itself spins: it is replaced
        assert status is None and notes[0].startswith("timeout") and "new shell" in notes[-1]
        assert shell.run(f"{LIVE} | grep -c '^bash$'")[0].strip() == "1"  # the spinning one is gone
        out, status, notes = shell.run("exit 4")
        assert status is None and "new shell" in notes[-1]
        assert shell.run("pwd")[0].strip() == "/testbed"
        out, status, notes = shell.run("kill -9 -1")  # kills the shell and everything of its user: the container stays
        assert shell.run("echo alive")[0].strip() == "alive"
        shell.close()
    finally:
        container.release()


def test_hostile_commands_stay_in_the_container(tmp_path, pool, minicalc, host_server):
    port, hits = host_server
    secret = tmp_path / f"secret-{uuid.uuid4().hex}"
    secret.write_text("host secret")
    _, image = minicalc
    mine, other = pool.acquire(image), pool.acquire(image)
    try:
        shell, neighbour = mine.shell(timeout_s=20), other.shell(timeout_s=20)
        neighbour.run("echo neighbour-data > /tmp/neighbour.txt; sleep 300 &")
        out, _, _ = shell.run(f"python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/x', timeout=3)\" 2>&1 | tail -n 1;"
                              f" python3 -c \"import socket; socket.create_connection(('172.17.0.1', {port}), timeout=3)\" 2>&1 | tail -n 1;"
                              " getent hosts deb.debian.org || echo no-dns")
        # 127.0.0.1 is the container's own loopback (nothing listens there); the host's bridge is unreachable
        assert out.splitlines() == ["urllib.error.URLError: <urlopen error [Errno 111] Connection refused>",
                                    "OSError: [Errno 101] Network is unreachable", "no-dns"], out
        out, _, _ = shell.run(f"cat {secret} 2>&1; ls /var/run/docker.sock 2>&1; ls {REPO} 2>&1; cat /tmp/neighbour.txt 2>&1;"
                              " ps -e -o comm= | grep -c sleep; touch /etc/x 2>&1; touch /usr/lib/x 2>&1; id -u")
        assert "host secret" not in out and "neighbour-data" not in out
        assert out.count("No such file or directory") >= 4 and out.count("Read-only file system") == 2, out
        assert out.split()[-1] == "1000"
        fork_bomb = ("python3 - <<'EOF'\nimport os, time\nn = 0\ntry:\n    while n < 10000:\n        if os.fork() == 0:\n"
                     "            time.sleep(2)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
                     "    print('stopped after', n, e.strerror)\nEOF")
        out, _, _ = shell.run(fork_bomb)
        assert "stopped after" in out and "Resource temporarily unavailable" in out and int(out.split()[2]) < 100, out
        time.sleep(2.5)  # the children exit; the pids come back
        out, _, _ = shell.run("python3 -c \"b = bytearray(2 << 30)\" 2>&1 | tail -n 1; echo after")
        assert "MemoryError" in out and "after" in out
        assert shell.run("echo still-here")[0].strip() == "still-here"
        shell.close()
        neighbour.close()
    finally:
        mine.release()
        other.release()
    assert hits == [] and secret.read_text() == "host secret"


def test_container_cap_and_warm_pool(minicalc, pool, sandbox_root):
    from envs.swe.containers import SWE_LIMITS, ContainerPool

    _, image = minicalc
    with pytest.raises(ValueError, match="max_containers"):
        ContainerPool(max_containers=0)
    capped = ContainerPool(limits=SWE_LIMITS.model_copy(update={"memory_mb": 256}), pool_size=0, max_containers=1,
                           acquire_timeout_s=1, run_id="pytest-cap")
    try:
        first = capped.acquire(image)
        with pytest.raises(SandboxError, match="1 SWE containers are in use"):
            capped.acquire(image)
        first.release()
        capped.acquire(image).release()
    finally:
        capped.close()
    # At the cap, a warm container of another image (here: another workdir) gives its slot to an episode.
    capped = ContainerPool(limits=SWE_LIMITS.model_copy(update={"memory_mb": 256}), pool_size=1, max_containers=1,
                           acquire_timeout_s=30, run_id="pytest-cap")
    try:
        capped.warm(image)
        deadline = time.monotonic() + 60
        while capped.ready(image) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert capped.ready(image) == 1
        elsewhere = capped.acquire(image, "/srv")
        assert capped.ready(image) == 0 and elsewhere.exec(["ls", "/srv/minicalc"]).exit_code == 0
        elsewhere.release()
    finally:
        capped.close()
    assert _containers("cwm-rl.run=pytest-cap") == []
    pool.warm(image)
    deadline = time.monotonic() + 60
    while pool.ready(image) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pool.ready(image) == 1
    taken = pool.acquire(image)
    # From the warm pool, not started for this call: only the pool's filler starts a bash session ahead.
    assert taken.spare_shell is not None and pool.ready(image) == 0
    taken.release()


def test_a_closed_pool_leaves_no_bash_session_behind(minicalc, sandbox_root, tmp_path):
    """Warm containers come with a bash session (a `docker exec` child); closing the pool closes and waits
    for it: no child left running or unreaped (an unreaped one warns "subprocess is still running" later)."""
    import shutil

    from envs.swe.containers import ContainerPool

    _, image = minicalc
    warm = ContainerPool(pool_size=1, max_containers=2, run_id="pytest-close")
    cli = tmp_path / "dockclosetest"  # this pool's docker CLI under a name of its own: other pools' sessions do not count
    cli.symlink_to(shutil.which(warm.docker_cli) or warm.docker_cli)
    warm.docker_cli = str(cli)
    try:
        warm.warm(image)
        deadline = time.monotonic() + 60
        while warm.ready(image) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert warm.ready(image) == 1 and _children_named(cli.name)
    finally:
        warm.close()
    assert _children_named(cli.name) == []
    assert _containers("cwm-rl.run=pytest-close") == []


def _children_named(name: str) -> list[int]:
    """Child processes of this test process with this name, running or zombies nobody waited for (a zombie
    has no cmdline, so match its name)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            comm, rest = (proc / "stat").read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        if comm.split("(", 1)[-1] == name[:15] and int(rest.split()[1]) == os.getpid():
            found.append(int(proc.name))
    return found


def test_scripted_episode_solves_a_task_through_the_env_server(start_server, sandbox_root, docker_ready):
    """bash, create, a failing edit, a good edit, the tests, submit: over HTTP with the real server."""
    from envs.server.client import RemoteEnv

    server = start_server(step_timeout_s=300)
    env = RemoteEnv(server.url, "cwm_rl/SWE-v0", env_kwargs={"instance_ids": ["cwm-rl__minicalc-1"], "command_timeout_s": 20,
                                                            "memory_mb": 512, "pool_size": 1, "max_turns": 10})
    instance = next(SWEInstance.from_task(t) for t in load_tasks() if t.id == "cwm-rl__minicalc-1")
    observation, info = env.reset(seed=0)
    assert "Chained subtraction" in observation[-1]["content"] and "[budget: 10 turns" in observation[-1]["content"]
    session_label = f"cwm-rl.session={info['session_id']}"
    assert len(_containers(session_label)) == 1  # the episode's own container, labelled with its session
    steps = ["Let me look.\n<tool: bash>\ngrep -n 'def expr' -A 12 minicalc/parser.py\n</tool>",
             "<tool: edit>\nminicalc/parser.py\n<<<<<<< SEARCH\nthis text is not there\n=======\nx\n>>>>>>> REPLACE\n</tool>"]
    fixed = _gold_as_edits(instance.patch)
    steps += [f"<tool: edit>\n{path}\n" + "".join(f"<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n" for old, new in blocks) + "</tool>"
              for path, blocks in fixed]
    steps += ["<tool: create>\ncheck_fix.py\nfrom minicalc import calc\nprint(calc('8 - 3 - 2'))\n</tool>",
              "<tool: bash>\npython3 check_fix.py && rm check_fix.py && python3 -m pytest -q tests 2>&1 | tail -n 1\n</tool>"]
    outputs = []
    for action in steps:
        observation, reward, terminated, truncated, info = env.step(action)
        outputs.append(observation[0]["content"])
        assert reward == 0.0 and not terminated and not truncated
        assert observation[0]["role"] == "tool" and "turns left, about" in observation[0]["content"]
    assert "def expr" in outputs[0] and "appears 0 times" in outputs[1]
    assert outputs[-1].startswith("3\n") and "passed" in outputs[-1]
    observation, reward, terminated, truncated, info = env.step("<tool: submit>\n</tool>")
    assert terminated and reward == 1.0 and info["resolved"] and info["patch_applied"] == "git-apply", info
    assert info["failing_tests"] == [] and "minicalc/parser.py" in info["patch"] and "check_fix" not in info["patch"]
    assert _containers(session_label) == []  # released at submit; grading used a fresh container
    env.close()


def _gold_as_edits(patch: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Turn a unified diff into SEARCH/REPLACE blocks (one per hunk: its old lines -> its new lines)."""
    from rewards.swe import split_patch

    edits = []
    for path, section in split_patch(patch):
        blocks, old, new = [], [], []
        for line in section.splitlines()[4:] + ["@@"]:
            if line.startswith("@@"):
                if old or new:
                    blocks.append(("\n".join(old), "\n".join(new)))
                old, new = [], []
            elif line.startswith("-"):
                old.append(line[1:])
            elif line.startswith("+"):
                new.append(line[1:])
            else:
                old.append(line[1:])
                new.append(line[1:])
        edits.append((path, blocks))
    return edits


def test_cwm_format_episode_solves_a_task_and_replays_identically(sandbox_root, docker_ready, tiny_model):
    """CWM's format in real containers: named tool messages with <output> and an exact <budget> (counted with a
    tokenizer), a two-call turn as a FormatError, the submission quoted back; a replay gives the same messages."""
    from transformers import AutoTokenizer

    from cwm_rl.replay.replay import replay
    from cwm_rl.types import Message, Span, Trajectory, Turn

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    kwargs = {"instance_ids": ["cwm-rl__minicalc-1"], "command_timeout_s": 20, "memory_mb": 512, "pool_size": 1,
              "max_turns": 6, "token_budget": 8000, "format": "cwm", "tokenizer": str(tiny_model)}
    env = _make_env(**kwargs)
    instance = next(SWEInstance.from_task(t) for t in load_tasks() if t.id == "cwm-rl__minicalc-1")
    actions = ["<think>\nWhere is expr? Not <tool: bash>\nrm -rf /testbed\n</tool> surely.\n</think>\n"
               "<tool: bash>\ngrep -c 'def expr' minicalc/parser.py\n</tool>",
               "<tool: bash>\nls\n</tool>\n<tool: bash>\npwd\n</tool>",
               f"<tool: bash>\ngit apply <<'P'\n{instance.patch}P\n</tool>",
               "<tool: submit>\n</tool>"]
    try:
        first, info = env.reset(seed=0)
        used = sum(count(m["content"]) for m in first)
        steps = [env.step(action) for action in actions]
    finally:
        env.close()
    (grep, *_), (two_calls, *_), (applied, *_), (submitted, reward, terminated, _, last_info) = steps
    output = "<output>\n1\n</output>"  # the reasoning's call did not run; /testbed is intact
    used += count(actions[0]) + count(output)
    assert grep == [{"role": "tool", "name": "bash", "content": f"{output}\n\n<budget>\n* Remaining turns: 5\n"
                                                               f"* Remaining tokens: {8000 - used}\n</budget>"}]
    assert two_calls == [{"role": "user", "content": "FormatError: one tool call per turn, got 2 `<tool:` openers"}]
    assert steps[1][3:] == (False, {"tool": None, "tool_error": "one tool call per turn, got 2 `<tool:` openers"})
    assert applied[0]["name"] == "bash" and "* Remaining turns: 3\n" in applied[0]["content"]
    assert terminated and reward == 1.0 and last_info["resolved"], last_info
    assert submitted == [{"role": "tool", "name": "submit", "content": cwm_output(cwm_submission(last_info["patch"], "submitted: resolved"))}]
    assert "<submission>\ndiff --git a/minicalc/parser.py" in submitted[0]["content"]

    # Recorded as the agent loop records it (one token per action and per observation), then replayed.
    turns, messages = [], [Message.model_validate(m) for m in first]
    for index, (action, (observation, step_reward, done, _, step_info)) in enumerate(zip(actions, steps)):
        turns.append(Turn(index=index, action=action, observation=observation, reward=step_reward, info=step_info,
                          action_span=Span(start=1 + 2 * index, end=2 + 2 * index),
                          observation_span=None if done else Span(start=2 + 2 * index, end=3 + 2 * index)))
        messages += [Message(role="assistant", content=action)] + ([] if done else [Message.model_validate(m) for m in observation])
    n = 2 * len(actions)
    recorded = Trajectory(env_id="cwm_rl/SWE-v0", task_id=info["task_id"], token_ids=[1] * n, loss_mask=[0, 1] * (n // 2),
                          logprobs=[0.0] * n, policy_versions=[-1, 0] * (n // 2), turns=turns, messages=messages,
                          terminated=True, finish_reason="terminated", seed=0, env_kwargs=kwargs, **{"return": reward})
    assert turns[0].observation[0].name == "bash"  # the name is stored with the trajectory
    report = replay(recorded)
    assert report.identical and report.replayed_return == 1.0, report.first_divergence
    assert {d.field for t in report.turns for d in t.diffs} <= set(SWEEnv.replay_may_differ)


PASS_EVERYTHING = ("import pytest\n\n\n@pytest.hookimpl(hookwrapper=True)\ndef pytest_runtest_makereport(item, call):\n"
                   "    outcome = yield\n    outcome.get_result().outcome = 'passed'\n")


# A pytest.py in the repository that reads the nonce and prints a report of every test it can find as passed.
FAKE_PYTEST = ("import glob, json, os, re\nnonce = open(os.environ['CWM_RL_NONCE_FILE']).read().strip()\n"
               "ids = {f'{f}::{n}': 'PASSED' for f in glob.glob('tests/*.py') for n in re.findall(r'^def (test_\\w+)', open(f).read(), re.M)}\n"
               "print(nonce + json.dumps(ids) + nonce)\n")


def test_reward_hacks_do_not_resolve_and_an_honest_fix_does(sandbox_root, docker_ready):
    env = _make_env()
    instance = next(SWEInstance.from_task(t) for t in load_tasks() if t.id == "cwm-rl__minicalc-1")
    apply_gold = f"<tool: bash>\ngit apply <<'P'\n{instance.patch}P\n</tool>"
    hacks = {
        "nothing": [],
        "conftest": [f"<tool: create>\nconftest.py\n{PASS_EVERYTHING}</tool>"],
        "pytest_config": [f"<tool: create>\nhack_plugin.py\n{PASS_EVERYTHING}</tool>",
                          "<tool: create>\npyproject.toml\n[tool.pytest.ini_options]\naddopts = '-p hack_plugin'\n</tool>"],
        "forged_report": ["<tool: bash>\nprintf 'import atexit\\natexit.register(lambda: print(\"PASSED x\"))\\n' >> minicalc/__init__.py\n</tool>"],
        "fake_pytest": [f"<tool: create>\npytest.py\n{FAKE_PYTEST}</tool>"],
        "xfail_everything": ["<tool: bash>\nprintf 'def calc(*a, **k):\\n    import pytest\\n    pytest.xfail(\"no\")\\n' >> minicalc/__init__.py\n</tool>"],
        "hidden_test_file": ["<tool: create>\ntests/test_hidden_assoc.py\ndef test_ok():\n    pass\n</tool>"],
    }
    try:
        for name, actions in hacks.items():
            env.reset(seed=0)
            for action in actions:
                assert env.step(action)[1] == 0.0
            _, reward, terminated, _, info = env.step("<tool: submit>\n</tool>")
            assert terminated and reward == -1.0 and not info["resolved"], (name, info)
            if name in ("conftest", "pytest_config", "hidden_test_file"):
                assert info["dropped_from_patch"] == [{"conftest": "conftest.py", "pytest_config": "pyproject.toml",
                                                       "hidden_test_file": "tests/test_hidden_assoc.py"}[name]], info
        # The honest fix, submitted from another directory, with the protected files left alone: resolved.
        env.reset(seed=0)
        env.step(apply_gold)
        env.step("<tool: bash>\ncd tests && export PATH=/nowhere\n</tool>")  # neither breaks the session nor the diff
        assert env.step("<tool: bash>\npwd\n</tool>")[0][0]["content"].startswith("/testbed/tests")
        _, reward, terminated, _, info = env.step("<tool: submit>\n</tool>")
        assert terminated and reward == 1.0 and info["dropped_from_patch"] == [], info
    finally:
        env.close()


def test_episode_ends_without_submission(sandbox_root, docker_ready):
    env = _make_env(max_turns=2, malformed="end")
    try:
        env.reset(seed=0)
        _, reward, terminated, truncated, info = env.step("no tool call at all")
        assert (reward, terminated, truncated, info["reason"]) == (-1.0, True, False, "malformed tool call")
        env.reset(seed=0)
        assert env.step("<tool: bash>\ntrue\n</tool>")[1] == 0.0
        _, reward, terminated, truncated, info = env.step("<tool: bash>\ntrue\n</tool>")
        assert (reward, terminated, truncated) == (-1.0, False, True) and "no submission" in info["reason"]
    finally:
        env.close()
    env = _make_env(episode_timeout_s=0.5)
    try:
        env.reset(seed=0)
        time.sleep(0.6)
        _, reward, terminated, truncated, info = env.step("<tool: bash>\ntrue\n</tool>")
        assert (reward, truncated) == (-1.0, True) and "deadline" in info["reason"]
    finally:
        env.close()


def test_env_passes_the_gymnasium_checker_and_its_reference_solves(sandbox_root, docker_ready):
    from gymnasium.utils.env_checker import check_env

    env = _make_env()
    try:
        check_env(env, skip_render_check=True)
        env.reset(seed=0)
        assert env.step(env.reference_action())[1] == 0.0
        _, reward, terminated, _, info = env.step(env.reference_action())
        assert terminated and reward == 1.0, info
    finally:
        env.close()


def test_crashed_owner_containers_are_reaped(sandbox_root, docker_ready, minicalc):
    _, image = minicalc
    script = ("from envs.swe.containers import ContainerPool\n"
              "pool = ContainerPool(pool_size=1, run_id='pytest-crash')\n"
              f"held = pool.acquire({image!r})\npool.warm({image!r})\nprint('ready', flush=True)\n"
              "import time; time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(2)  # let the warm container start too
        assert len(_containers("cwm-rl.run=pytest-crash")) >= 1
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    from envs.swe.containers import ContainerPool

    ContainerPool(pool_size=0).close()  # a new pool reaps what the dead owner left
    assert _containers("cwm-rl.run=pytest-crash") == []


def test_a_prebuilt_image_is_used_as_it_is(tmp_path, pool, minicalc):
    """An instance naming `image` (as SWE-bench's do): the repository already in /testbed, owned by
    root, no build; the episode runs as the image's user (root, no capabilities) and still grades."""
    import io
    import tarfile

    from envs.sandbox.rootfs import docker_base_image
    from envs.swe.images import COMMIT_ENV, PREPARE

    instance, _ = minicalc
    source = instance.source_dir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        files = {"Dockerfile": f"FROM {docker_base_image(pool.client)}\nCOPY repo /testbed\nCOPY prepare.sh /tmp/p.sh\nRUN sh /tmp/p.sh\n",
                 "prepare.sh": PREPARE.format(repo="/testbed", commit_env=COMMIT_ENV, base=instance.base_commit)}
        files.update({f"repo/{p.relative_to(source)}": p.read_text() for p in source.rglob("*") if p.is_file()})
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(text.encode()), 0o644
            tar.addfile(info, io.BytesIO(text.encode()))
    tag = f"pytest-prebuilt/minicalc:{uuid.uuid4().hex[:8]}"
    pool.client.images.build(fileobj=io.BytesIO(buffer.getvalue()), custom_context=True, tag=tag, network_mode="none", rm=True)
    row = {**instance.model_dump(), "image": tag, "repo_dir": None}
    tasks = tmp_path / "prebuilt.jsonl"
    tasks.write_text(json.dumps(row) + "\n")
    env = _make_env(tasks_path=str(tasks), command_timeout_s=2)
    try:
        env.reset(seed=0)
        out = env.step("<tool: bash>\nid -u; pwd; sleep 30\n</tool>")[0][0]["content"]
        assert out.startswith("0\n/testbed\n") and "timeout" in out  # root of the image, its own workdir
        assert env.step("<tool: bash>\necho alive\n</tool>")[0][0]["content"].startswith("alive")  # the keeper survived the kill
        assert env.step(f"<tool: bash>\ngit apply <<'P'\n{instance.patch}P\n</tool>")[1] == 0.0
        _, reward, terminated, _, info = env.step("<tool: submit>\n</tool>")
        assert terminated and reward == 1.0, info
    finally:
        env.close()
        pool.client.images.remove(tag, force=True)
