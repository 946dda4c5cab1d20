"""`cwm-rl view` (cwm_rl/cli/view.py): a real server process answering on 127.0.0.1, and one-line errors for bad input."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cwm_rl.cli.view import check_host
from cwm_rl.viewer.demo import build_demo

CLI = str(Path(sys.executable).with_name("cwm-rl"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_the_page_and_api(tmp_path):
    run = build_demo(tmp_path / "demo", num_steps=2, tokenizer=False, analysis=False)
    port = _free_port()
    proc = subprocess.Popen([CLI, "view", str(run), "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "the viewer did not start listening"
                time.sleep(0.2)
        assert page.status_code == 200 and "cwm-rl viewer" in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/api/runs").json()["runs"][0]["name"] == "demo"
        # A page on another site that rebinds its DNS name to 127.0.0.1 still sends its own Host: refused.
        rebound = httpx.get(f"http://127.0.0.1:{port}/api/runs", headers={"Host": f"evil.example:{port}"})
        assert rebound.status_code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("args, words", [
    (["{missing}"], "is not a directory"),
    (["{empty}"], "no rollouts.sqlite"),
    (["{run}", "--host", "0.0.0.0"], "--allow-remote"),
    (["{run}", "--port", "{busy}"], "pick another port"),
])
def test_bad_input_is_one_line(tmp_path, args, words):
    run = build_demo(tmp_path / "demo", num_steps=1, tokenizer=False, analysis=False)
    (tmp_path / "empty").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "run": run, "busy": busy.getsockname()[1]}
        argv = [a.format(**values) for a in args]
        out = subprocess.run([CLI, "view", *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], out.stderr


def test_remote_hosts_need_allow_remote():
    check_host("127.0.0.1", False)
    check_host("::1", False)
    check_host("localhost", False)
    check_host("0.0.0.0", True)
    with pytest.raises(ValueError, match="--allow-remote"):
        check_host("0.0.0.0", False)
    with pytest.raises(ValueError, match="not an IP address"):
        check_host("example.org", False)
