"""Configs a retry cannot fix fail fast, in one line naming the key: refused before Ray and vLLM start
(preflight, the job config), or, when only the engine can tell, on its first failed start, never retried."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cwm_rl.config import load_config
from cwm_rl.loop import preflight
from cwm_rl.loop.preflight import CPU_ATTENTION_HEAD_SIZES, check_engine_config
from rollout_workers.actor import root_cause

ROOT = Path(__file__).parents[3]
CLI = str(Path(sys.executable).with_name("cwm-rl"))


def model_with(tiny_model: Path, tmp_path: Path, **config) -> Path:
    """A copy of the tiny model whose config.json has `config` changed (the weights are not read here)."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model, out)
    hf = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**hf, **config}))
    return out


def refusal(config_overrides: list[str], model_dir: Path) -> str:
    with pytest.raises(ValueError) as e:
        check_engine_config(load_config(None, config_overrides), model_dir)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_context_longer_than_the_models_is_refused(tiny_model):
    message = refusal(["rollout.engine.max_model_len=4096"], tiny_model)
    assert message == (f"rollout.engine.max_model_len (4096) is longer than the model's context (max_position_embeddings 2048 "
                       f"in {tiny_model / 'config.json'}): set rollout.engine.max_model_len <= 2048")
    check_engine_config(load_config(None, ["rollout.engine.max_model_len=2048"]), tiny_model)  # the model's own length is fine


def test_rope_scaling_stretches_the_context_as_vllm_counts_it(tiny_model, tmp_path):
    scaled = model_with(tiny_model, tmp_path, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    check_engine_config(load_config(None, ["rollout.engine.max_model_len=4096"]), scaled)
    assert "x rope factor 2.0 = 4096" in refusal(["rollout.engine.max_model_len=4097"], scaled)


def test_a_head_size_the_cpu_attention_lacks_is_refused_on_cpu(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")  # vLLM's own switch: the CPU backend, also on a GPU machine
    # 8 heads x 16 = 128 = hidden size: the same weights, a head size vLLM's CPU kernels do not have
    head16 = model_with(tiny_model, tmp_path, head_dim=16, num_attention_heads=8, num_key_value_heads=4)
    message = refusal([], head16)
    assert message.startswith(f"model.path {head16}: head size 16 is not one vLLM's CPU attention supports (32, 64, ")
    check_engine_config(load_config(None, []), tiny_model)  # head size 64 is fine


def test_compiling_on_the_cpu_without_a_cpp_compiler_is_refused(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    compiled = load_config(None, ["rollout.engine.enforce_eager=false"])
    check_engine_config(compiled, tiny_model)  # g++ is here (scripts/setup.sh installs it)
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on PATH
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match=r"^rollout.engine.enforce_eager is false: .* a C\+\+ compiler \(\$CXX, else g\+\+\) is "
                                         r"missing here: .* set rollout.engine.enforce_eager=true$"):
        check_engine_config(compiled, tiny_model)
    check_engine_config(load_config(None, ["rollout.engine.enforce_eager=true"]), tiny_model)  # eager needs none
    monkeypatch.setenv("PATH", path)
    monkeypatch.setattr(preflight, "python_headers", lambda: False)  # a compiler, no Python.h
    with pytest.raises(ValueError, match=r"and Python.h is missing here: install g\+\+ and the Python headers"):
        check_engine_config(compiled, tiny_model)


def test_an_engine_whose_compile_failed_is_told_to_run_eager(tiny_model):
    from cwm_rl.loop.workers import engine_fix

    reason = "torch._inductor.exc.InductorError: CppCompileError: C++ compile error: fatal error: Python.h: No such file"
    assert engine_fix(reason, load_config(None, ["rollout.engine.enforce_eager=false"]), tiny_model).startswith(
        "set rollout.engine.enforce_eager=true")
    assert "kv_cache_gib" in engine_fix("No available memory for the cache blocks", load_config(None, []), tiny_model)


def test_an_unknown_dtype_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"rollout.engine.dtype 'fp32' is not a dtype vLLM knows: set rollout.engine.dtype "
                                         r"to one of float32, bfloat16, float16, half, float, auto"):
        load_config(None, ["rollout.engine.dtype=fp32"])
    assert load_config(None, ["rollout.engine.dtype=BFloat16"]).rollout.engine.dtype == "BFloat16"  # vLLM lowercases it


def test_an_episode_longer_than_the_engine_holds_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"rollout.limits.max_total_tokens \(2000\) is more than rollout.engine.max_model_len "
                                         r"\(1024\), the longest sequence the engine holds: set rollout.limits.max_total_tokens <= 1024"):
        load_config(None, ["rollout.limits.max_total_tokens=2000"])
    # Left unset, the limit is cut to what the engine holds (a saved config.yaml stays valid on resume).
    assert load_config(None, ["rollout.engine.max_model_len=300"]).rollout.limits.max_total_tokens is None  # = max_model_len
    with pytest.raises(ValueError, match=r"envs\[1\].limits.max_total_tokens \(2048\) is more than rollout.engine.max_model_len"):
        load_config(None, ["envs=[{id: cwm_rl/Math-v0}, {id: cwm_rl/Echo-v0, limits: {max_turns: 3, max_total_tokens: 2048}}]"])
    mixed = load_config(None, ["rollout.limits.env_timeout_s=7", "envs=[{id: cwm_rl/Echo-v0, limits: {max_turns: 3}}, {id: cwm_rl/Math-v0}]"])
    assert mixed.env_limits(0).model_dump() == {"max_turns": 3, "max_total_tokens": None, "env_timeout_s": 7.0}  # the rest from rollout.limits
    assert mixed.env_limits(1) == mixed.rollout.limits
    saved = load_config(None, ["envs=" + json.dumps([e.model_dump(mode="json") for e in mixed.envs]), "rollout.limits.env_timeout_s=9"])
    assert saved.env_limits(0).env_timeout_s == 9  # as config.yaml saves it: unset fields stay unset, a resume's --set reaches them


def test_root_cause_is_the_error_vllm_points_at():
    log = """(EngineCore pid=5666) ERROR 12-02 13:25:52 [core.py:1510] EngineCore failed to start.
(EngineCore pid=5666) ERROR 12-02 13:25:52 [core.py:1510] Traceback (most recent call last):
(EngineCore pid=5666) ERROR 12-02 13:25:52 [core.py:1510] ValueError: No available memory for the cache blocks.
(Worker pid=6976) ERROR 12-02 13:27:43 [multiproc_executor.py:1063] vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.
"""
    wrapper = "Traceback (most recent call last):\nRuntimeError: Engine core initialization failed. See root cause above."
    assert root_cause(log, wrapper) == "ValueError: No available memory for the cache blocks."
    assert root_cause("", wrapper) is None
    assert root_cause("nothing here") is None


@pytest.mark.parametrize(("override", "names"), [
    ("rollout.engine.max_model_len=99999", "rollout.engine.max_model_len (99999) is longer than the model's context"),
    ("rollout.engine.dtype=fp16x", "set rollout.engine.dtype to one of"),
    ("rollout.limits.max_total_tokens=512", "set rollout.limits.max_total_tokens <= 256"),
])
def test_cwm_rl_train_refuses_such_a_config_in_seconds(tiny_model, tmp_path, override, names):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    r = subprocess.run([CLI, "train", str(ROOT / "configs" / "quickstart.yaml"), "--set", f"run_dir={run_dir}",
                        "--set", f"model.path={tiny_model}", "--set", override],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    elapsed = time.monotonic() - started
    assert r.returncode == 2, r.stdout + r.stderr
    assert names in r.stderr, r.stderr
    assert elapsed < 30, f"took {elapsed:.0f} s: something heavy started first"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "rollouts.sqlite").exists()  # no trainer, no store


@pytest.mark.vllm
def test_the_cpu_head_sizes_are_the_installed_vllms():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == CPU_ATTENTION_HEAD_SIZES


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_an_engine_that_cannot_start_stops_the_job_once_with_its_cause(tiny_model, tmp_path):
    # Passes every check before Ray, but no KV-cache block fits in 10 KiB: vLLM refuses at engine start.
    run_dir = tmp_path / "run"
    started = time.monotonic()
    r = subprocess.run([CLI, "train", str(ROOT / "configs" / "quickstart.yaml"), "--set", f"run_dir={run_dir}",
                        "--set", f"model.path={tiny_model}", "--set", "rollout.engine.kv_cache_gib=0.00001",
                        "--set", "logging.progress=false", "--set", "rollout.engine.enforce_eager=true"],
                       capture_output=True, text=True, timeout=360, env={**os.environ, "COLUMNS": "200"})
    elapsed = time.monotonic() - started
    output = r.stdout + r.stderr
    assert r.returncode == 2, output[-4000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-4000:]
    assert errors[0].startswith("error: rollout worker 0 could not start its vLLM engine: ValueError: No available memory "
                                "for the cache blocks."), errors[0]
    assert "raise rollout.engine.kv_cache_gib (now 1e-05)" in errors[0]
    assert "worker 0 failed" not in output and "Traceback" not in output  # not restarted, no traceback for the user
    # One start: Ray would restart a dead worker 3 times (minutes); the job ends with the first failure.
    assert elapsed < 150, f"took {elapsed:.0f} s"
