"""The job config: the shipped YAML validates, overrides parse as YAML, mistakes are named."""

from pathlib import Path

import pytest

from cwm_rl.config import JobConfig, apply_overrides, load_config

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def test_quickstart_config_validates():
    config = load_config(QUICKSTART)
    assert config.mode == "async" and config.envs[0].id == "cwm_rl/Math-v0"
    assert config.model.sft.steps > 0 and config.model.path is None


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
    with pytest.raises(ValueError, match="stop_at_accuracy needs model.sft.eval_every"):
        JobConfig.model_validate({"model": {"sft": {"steps": 10, "stop_at_accuracy": 0.3}}})


def test_env_servers_and_urls_are_listed_in_order():
    spec = JobConfig.model_validate({"envs": [{"id": "cwm_rl/Math-v0", "url": "http://a:1", "urls": ["http://b:2", "http://a:1"],
                                               "servers": 2}]}).envs[0]
    assert spec.endpoints == ["http://a:1", "http://b:2"] and spec.servers == 2
