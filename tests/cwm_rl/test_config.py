"""The job config: the shipped YAML validates, overrides parse as YAML, mistakes are named."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cwm_rl.config import JobConfig, apply_overrides, load_config

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def test_quickstart_config_validates():
    config = load_config(QUICKSTART)
    assert config.mode == "async" and config.envs[0].id == "cwm_rl/Math-v0"
    assert config.model.sft.steps > 0 and config.model.path is None


def test_every_shipped_config_validates_and_its_envs_offer_tasks():
    """configs/*.yaml load, and each env of their mixes can be made and split into held-out and training tasks
    without a reset (no Docker needed for the SWE config's split)."""
    from cwm_rl.loop.tasks import job_tasks

    configs = sorted(QUICKSTART.parent.glob("*.yaml"))
    assert {p.name for p in configs} >= {"quickstart.yaml", "code_trace.yaml", "swe.yaml"}
    for path in configs:
        config = load_config(path)
        mix = job_tasks(config.envs, config.seed, config.eval.num_tasks, config.model.sft.eval_share, {}, mix_seed=0)
        for i, spec in enumerate(config.envs):
            held = {t["id"] for t in mix.held_out[spec.id]}
            assert held and not held & {t["id"] for _, t in mix.draw(8, i)}, (path.name, spec.id)
        mix.close()
    swe = load_config(QUICKSTART.with_name("swe.yaml")).envs[0]
    assert swe.servers == 1 and swe.limits.max_turns > swe.kwargs["max_turns"]  # the env ends its episodes, not the worker


def test_overrides_are_parsed_as_yaml_and_nested():
    config = load_config(QUICKSTART, ["trainer.optim.lr=3e-4", "run_dir=/tmp/x", "rollout.sampling.max_tokens=16",
                                      "envs=[{id: cwm_rl/Echo-v0, weight: 2}]"])
    assert config.trainer.optim.lr == pytest.approx(3e-4)
    assert config.run_dir == "/tmp/x" and config.rollout.sampling.max_tokens == 16
    assert config.envs[0].id == "cwm_rl/Echo-v0" and config.envs[0].weight == 2


def test_unknown_keys_and_bad_values_name_the_field():
    with pytest.raises(ValueError, match=r"trainer\.optim\.lrr: Extra inputs are not permitted"):
        load_config(QUICKSTART, ["trainer.optim.lrr=1"])
    with pytest.raises(ValueError, match=r"rollout\.group_size"):
        load_config(None, ["rollout.group_size=0"])


def test_extra_engine_args_may_not_repeat_an_engine_field():
    with pytest.raises(ValueError, match=r"extra_engine_args\.block_size is set by cwm-rl: use the engine's `block_size` field"):
        load_config(QUICKSTART, ["rollout.engine.extra_engine_args={block_size: 32}"])
    with pytest.raises(ValueError, match=r"extra_engine_args\.logprobs_mode .*processed logprobs"):
        load_config(QUICKSTART, ["rollout.engine.extra_engine_args={logprobs_mode: raw_logprobs}"])
    config = load_config(QUICKSTART, ["rollout.engine.extra_engine_args={swap_space: 1}"])  # any other vLLM argument passes
    assert config.rollout.engine.extra_engine_args == {"swap_space": 1}


def test_bad_override_syntax_and_files():
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        apply_overrides({}, ["trainer.optim.lr"])
    with pytest.raises(ValueError, match="is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
    with pytest.raises(FileNotFoundError, match="quickstart.yaml for an example"):
        load_config("/nonexistent.yaml")


def test_temperature_must_match_between_sampling_and_trainer():
    with pytest.raises(ValueError, match="must score tokens at the temperature they were sampled at"):
        JobConfig.model_validate({"rollout": {"sampling": {"temperature": 0.7}}})
    ok = JobConfig.model_validate({"rollout": {"sampling": {"temperature": 0.7}}, "trainer": {"loss": {"temperature": 0.7}}})
    assert ok.trainer.loss.temperature == 0.7


def test_the_warm_start_holds_out_at_least_the_tasks_rl_evaluates_on():
    with pytest.raises(ValueError, match="would train on tasks the RL eval holds out"):
        JobConfig.model_validate({"model": {"sft": {"steps": 10, "eval_tasks": 50}}, "eval": {"num_tasks": 100}})
    JobConfig.model_validate({"model": {"sft": {"steps": 10, "eval_tasks": 100}}, "eval": {"num_tasks": 100}})
    JobConfig.model_validate({"model": {"path": "m", "sft": {"steps": 10, "eval_tasks": 50}}, "eval": {"num_tasks": 100}})  # no SFT here


def test_stop_at_accuracy_needs_eval_every():
    with pytest.raises(ValueError, match=r"model\.sft: .*stop_at_accuracy needs eval_every"):
        load_config(None, ["model.sft.steps=10", "model.sft.stop_at_accuracy=0.3"])


def test_the_sft_stage_is_sft_config_with_the_jobs_defaults():
    config = load_config(None, ["seed=3", "envs=[{id: cwm_rl/Math-v0, kwargs: {difficulty: 2}}]", "model.sft.steps=5"])
    sft = config.model.sft.resolve(config.envs, config.seed)
    assert (sft.env_id, sft.env_kwargs, sft.seed, sft.steps) == ("cwm_rl/Math-v0", {"difficulty": 2}, 3, 5)
    assert sft.num_threads == os.cpu_count()  # the warm start runs before the workers: every core
    own = load_config(None, ["model.sft.env_id=cwm_rl/Echo-v0", "model.sft.env_kwargs={}", "model.sft.seed=7"]).model.sft
    assert own.resolve(config.envs, 3).model_dump(include={"env_id", "env_kwargs", "seed"}) == \
        {"env_id": "cwm_rl/Echo-v0", "env_kwargs": {}, "seed": 7}


def test_a_warm_start_mix_takes_each_envs_kwargs_from_the_job_and_is_checked_up_front():
    envs = "envs=[{id: cwm_rl/Math-v0, kwargs: {difficulty: 2}}, {id: cwm_rl/Trace-v0, kwargs: {mode: trace}}]"
    config = load_config(None, [envs, "model.sft.steps=5",
                                "model.sft.mix=[{id: cwm_rl/Math-v0}, {id: cwm_rl/Trace-v0, weight: 2, kwargs: {mode: output}}]"])
    sft = config.model.sft.resolve(config.envs, config.seed)
    assert sft.env_id is None and [(e.id, e.kwargs, e.weight) for e in sft.envs()] == [
        ("cwm_rl/Math-v0", {"difficulty": 2}, 1.0), ("cwm_rl/Trace-v0", {"mode": "output"}, 2.0)]
    # Weights unset in the mix are the job's: an env the job only evaluates (weight 0) is not trained on by SFT either.
    zero = load_config(None, [envs, "envs.1.weight=0", "model.sft.steps=5", "model.sft.eval_every=5", "model.sft.stop_at_accuracy=0.5",
                              "model.sft.mix=[{id: cwm_rl/Math-v0}, {id: cwm_rl/Trace-v0}]"])
    resolved = zero.model.sft.resolve(zero.envs, 0)
    assert [e.weight for e in resolved.envs()] == [1.0, 0.0] and resolved.stop_targets() == {"cwm_rl/Math-v0": 0.5}
    first_trained = load_config(None, [envs, "envs.0.weight=0", "model.sft.steps=5"])
    assert first_trained.model.sft.resolve(first_trained.envs, 0).env_id == "cwm_rl/Trace-v0"
    # A named env keeps the kwargs of the job's env with that id (not the first env's).
    own = load_config(None, [envs, "model.sft.steps=5", "model.sft.env_id=cwm_rl/Trace-v0"]).model.sft
    assert own.resolve(load_config(None, [envs]).envs, 0).env_kwargs == {"mode": "trace"}
    for bad, match in [("model.sft.mix=[{id: cwm_rl/Math-v0}, {id: cwm_rl/Math-v0}]", "names an env twice"),
                       ("model.sft.stop_at_accuracy={cwm_rl/Echo-v0: 0.5}", r"model\.sft: stop_at_accuracy names \['cwm_rl/Echo-v0'\]"),
                       ("model.sft.env_id=cwm_rl/Math-v0", "not both")]:
        with pytest.raises(ValueError, match=match):
            load_config(None, [envs, "model.sft.steps=5", "model.sft.eval_every=5",
                               "model.sft.mix=[{id: cwm_rl/Math-v0}, {id: cwm_rl/Trace-v0}]", bad])


def test_an_item_of_a_list_is_overridden_by_its_index_and_weight_0_evaluates_only():
    envs = "envs=[{id: cwm_rl/Math-v0}, {id: cwm_rl/Trace-v0, kwargs: {mode: output}}]"
    config = load_config(None, [envs, "envs.1.weight=0", "envs.1.kwargs.difficulty=2"])
    assert [(s.id, s.weight) for s in config.envs] == [("cwm_rl/Math-v0", 1.0), ("cwm_rl/Trace-v0", 0.0)]
    assert config.envs[1].kwargs == {"mode": "output", "difficulty": 2}
    with pytest.raises(ValueError, match=r"'envs' is a list of 2; index it with 0\.\.1"):
        load_config(None, [envs, "envs.2.weight=0"])
    with pytest.raises(ValueError, match="every env has weight 0"):
        load_config(None, [envs, "envs.0.weight=0", "envs.1.weight=0"])
    from cwm_rl.loop.tasks import TaskMix, held_out_tasks, make_task_env

    held_out = {s.id: held_out_tasks(make_task_env(s), seed=0, num_tasks=5) for s in config.envs}
    mix = TaskMix(config.envs, seed=0, held_out=held_out, cursors={}, mix_seed=0)
    assert {mix.pick_env() for _ in range(500)} == {0}  # an env of weight 0 is never trained on
    mix.close()


def test_moved_keys_say_where_they_went():
    with pytest.raises(ValueError) as e:
        load_config(None, ["trainer.checkpoint_every=5", "rollout.max_model_len=512", "trainer.publish.keep_last=2"])
    for old, new in (("trainer.checkpoint_every", "checkpoint_every"), ("rollout.max_model_len", "rollout.engine.max_model_len"),
                     ("trainer.publish", "publish")):
        assert f"{old}: Extra inputs are not permitted (it moved: use {new})" in str(e.value)


def test_the_engine_model_is_the_jobs():
    with pytest.raises(ValueError, match="rollout.engine.model .* is set by the job: name the policy with model.path"):
        load_config(None, ["rollout.engine.model=/tmp/m"])


def test_loading_a_config_imports_no_torch_vllm_or_ray():
    code = ("import sys; from cwm_rl.config import load_config; load_config(sys.argv[1]); "
            "import cwm_rl.cli; import cwm_rl.loop.driver; "
            "heavy = [m for m in ('torch', 'vllm', 'ray', 'transformers') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    run = subprocess.run([sys.executable, "-c", code, str(QUICKSTART)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_env_servers_and_urls_are_listed_in_order():
    spec = JobConfig.model_validate({"envs": [{"id": "cwm_rl/Math-v0", "url": "http://a:1", "urls": ["http://b:2", "http://a:1"],
                                               "servers": 2}]}).envs[0]
    assert spec.endpoints == ["http://a:1", "http://b:2"] and spec.servers == 2


def test_job_engines_hold_1024_tokens_unless_told_otherwise():
    assert load_config(None).rollout.engine.max_model_len == 1024
    assert load_config(None, ["rollout.engine.kv_cache_gib=1"]).rollout.engine.max_model_len == 1024
    assert load_config(None, ["rollout.engine.max_model_len=300"]).rollout.engine.max_model_len == 300
    assert load_config(None).model.sft.eval_tasks == 100  # the job's warm-start default, not cwm-rl model sft's 200


def test_env_server_token_comes_from_the_environment_and_stays_out_of_the_config(monkeypatch):
    """A job names its env server by URL and takes the bearer token from $CWM_RL_ENV_TOKEN, so the secret is
    never written into run_dir/config.yaml; a token in the config wins. (tests/cwm_rl/loop/test_cluster.py
    runs a job against a server that requires it.)"""
    monkeypatch.setenv("CWM_RL_ENV_TOKEN", "from-the-environment")
    config = load_config(None, ["envs=[{id: cwm_rl/Math-v0, url: 'http://127.0.0.1:9'}]"])
    assert config.envs[0].bearer_token == "from-the-environment"
    assert "from-the-environment" not in str(config.model_dump())
    assert load_config(None, ["envs=[{id: cwm_rl/Math-v0, token: in-the-config}]"]).envs[0].bearer_token == "in-the-config"
    monkeypatch.delenv("CWM_RL_ENV_TOKEN")
    assert config.envs[0].bearer_token is None
