"""Weight publishing (`files` backend): complete HF checkpoint dirs, atomic LATEST, pruning, subscribers."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from trainer.publish import PublishConfig, WeightPublisher, latest_published, make_publisher, wait_for_version


@pytest.fixture(scope="module")
def perturbed_state(tiny_model) -> dict[str, torch.Tensor]:
    """The tiny model's state dict with noise on every tensor: weights a trainer would publish."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return {name: t + torch.randn(t.shape, generator=generator) * 0.05 for name, t in model.state_dict().items()}


@pytest.fixture
def publisher(tmp_path, tiny_model):
    pub = WeightPublisher(tmp_path / "weights", base_model_dir=tiny_model)
    yield pub
    pub.close()


def published_tensors(version_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(version_dir / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_a_version_is_a_complete_checkpoint_that_transformers_loads(publisher, tiny_model, perturbed_state, no_warnings_allowed):
    before = time.time()
    path = publisher.publish(1, perturbed_state)

    assert path == publisher.root / "v00000001" and path.is_dir()
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in tiny_model.iterdir())
    for base_file in tiny_model.iterdir():
        if not base_file.name.endswith(".safetensors"):
            assert (path / base_file.name).read_bytes() == base_file.read_bytes(), base_file.name
    with safe_open(path / "model.safetensors", "pt") as f, safe_open(tiny_model / "model.safetensors", "pt") as base:
        assert set(f.keys()) == set(base.keys())
        assert f.metadata() == {"format": "pt"}

    with no_warnings_allowed():
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    loaded = model.state_dict()
    for name, tensor in perturbed_state.items():
        assert torch.equal(loaded[name], tensor), name

    assert latest_published(publisher.root) == (1, path)
    pointer = json.loads((publisher.root / "LATEST").read_text())
    assert pointer["version"] == 1 and pointer["path"] == "v00000001"
    assert before <= pointer["published_at"] <= time.time()
    assert publisher.latest_version == 1


def test_static_files_are_copied_once_and_hard_linked(publisher, perturbed_state):
    first, second = publisher.publish(1, perturbed_state), publisher.publish(2, perturbed_state)
    static = publisher.root / ".static" / "tokenizer.json"
    assert (first / "tokenizer.json").stat().st_ino == (second / "tokenizer.json").stat().st_ino == static.stat().st_ino
    assert not (publisher.root / ".static" / "model.safetensors").exists()


def test_wrapped_state_dicts_and_models_publish_under_checkpoint_names(publisher, tiny_model, perturbed_state):
    ddp_style = {f"module.{name}": t for name, t in perturbed_state.items()}
    compiled_ddp_style = {f"_orig_mod.module.{name}": t for name, t in perturbed_state.items()}
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.load_state_dict(perturbed_state)
    for version, state in enumerate([ddp_style, compiled_ddp_style, model], start=1):
        written = published_tensors(publisher.publish(version, state))
        assert set(written) == set(perturbed_state)
        assert all(torch.equal(written[name], t) for name, t in perturbed_state.items())


def test_tied_embeddings_are_written_once_and_load_tied(tmp_path, tiny_model, no_warnings_allowed):
    """With tie_word_embeddings, lm_head.weight is the embedding matrix: save_pretrained omits it, so do we."""
    base = tmp_path / "tied-base"
    config = AutoConfig.from_pretrained(tiny_model)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(base)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, base / f.name)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()

    publisher = WeightPublisher(tmp_path / "weights", base_model_dir=base)
    path = publisher.publish(1, state)
    publisher.close()
    assert "lm_head.weight" not in published_tensors(path)
    with no_warnings_allowed():
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert torch.equal(reloaded.lm_head.weight, model.model.embed_tokens.weight)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_a_state_dict_of_another_model_is_refused_with_the_names(publisher, perturbed_state):
    missing = {n: t for n, t in perturbed_state.items() if n != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"not in the state dict \(1\): model\.norm\.weight"):
        publisher.publish(1, missing)
    resized = {**perturbed_state, "lm_head.weight": torch.zeros(5, 128)}
    vocab_size = perturbed_state["lm_head.weight"].shape[0]
    with pytest.raises(ValueError, match=rf"shape mismatch \(1\): lm_head\.weight: state dict \(5, 128\), base model \({vocab_size}, 128\)"):
        publisher.publish(1, resized)
    extra = {**perturbed_state, "value_head.weight": torch.zeros(1, 128)}
    with pytest.raises(ValueError, match=r"not in the base model \(1\): value_head\.weight"):
        publisher.publish(1, extra)
    assert latest_published(publisher.root) is None
    assert [p.name for p in publisher.root.iterdir() if not p.name.startswith(".static")] == []


def test_keep_last_prunes_the_oldest_versions(tmp_path, tiny_model, perturbed_state):
    publisher = WeightPublisher(tmp_path / "weights", base_model_dir=tiny_model, keep_last=2)
    paths = [publisher.publish(version, perturbed_state) for version in (1, 2, 5)]
    publisher.close()  # pruning runs in the background
    assert [p.exists() for p in paths] == [False, True, True]
    assert latest_published(publisher.root) == (5, paths[-1])
    with pytest.raises(RuntimeError, match="closed"):
        publisher.publish(6, perturbed_state)
    with pytest.raises(ValueError, match="keep_last=0"):
        WeightPublisher(tmp_path / "other", base_model_dir=tiny_model, keep_last=0)


def test_leftovers_of_a_crashed_publish_are_removed_at_init(tmp_path, tiny_model, perturbed_state):
    root = tmp_path / "weights"
    first = WeightPublisher(root, base_model_dir=tiny_model)
    published = first.publish(3, perturbed_state)
    first.close()
    crashed = root / ".tmp-v4-12345"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half a file")
    (root / ".tmp-LATEST-12345").write_text("{")

    second = WeightPublisher(root, base_model_dir=tiny_model)
    assert not crashed.exists() and not (root / ".tmp-LATEST-12345").exists()
    assert published.is_dir() and second.latest_version == 3  # a restarted publisher continues after what is there
    with pytest.raises(ValueError, match="versions must increase"):
        second.publish(3, perturbed_state)
    assert second.publish(4, perturbed_state) == root / "v00000004"
    second.close()


def test_repeating_or_going_back_a_version_is_an_error(publisher, perturbed_state):
    publisher.publish(2, perturbed_state)
    for version in (2, 1):
        with pytest.raises(ValueError, match=rf"cannot publish weights version {version} .*version 2 is already published"):
            publisher.publish(version, perturbed_state)
    with pytest.raises(ValueError, match="int >= 0"):
        publisher.publish(-1, perturbed_state)
    assert latest_published(publisher.root)[0] == 2


def test_subscribers_are_called_and_one_failing_does_not_stop_the_others(publisher, perturbed_state, caplog):
    calls: list[tuple[int, Path]] = []

    def broken(version, path):
        raise RuntimeError("engine is down")

    publisher.subscribe(broken)
    publisher.subscribe(lambda version, path: calls.append((version, path)))
    with caplog.at_level(logging.ERROR, logger="trainer.publish"):
        first = publisher.publish(1, perturbed_state)
        second = publisher.publish(2, perturbed_state)
    assert calls == [(1, first), (2, second)]
    assert latest_published(publisher.root) == (2, second)
    failures = [r for r in caplog.records if "subscriber" in r.getMessage()]
    assert len(failures) == 2 and "engine is down" in failures[0].exc_text


async def test_wait_for_version_returns_when_another_thread_publishes(publisher, perturbed_state):
    publisher.publish(1, perturbed_state)
    assert await wait_for_version(publisher.root, 1, timeout_s=1) == (1, publisher.root / "v00000001")

    thread = threading.Timer(0.2, publisher.publish, args=(2, perturbed_state))
    thread.start()
    started = time.monotonic()
    version, path = await wait_for_version(publisher.root, 2, timeout_s=30, poll_s=0.01)
    thread.join()
    assert (version, path) == (2, publisher.root / "v00000002") and (path / "model.safetensors").is_file()
    assert time.monotonic() - started >= 0.15


async def test_wait_for_version_times_out_with_a_clear_error(tmp_path, publisher, perturbed_state):
    with pytest.raises(TimeoutError, match=r"no weights version >= 1 .* within 0.1 s \(latest: nothing\)"):
        await wait_for_version(tmp_path / "nowhere", 1, timeout_s=0.1)
    publisher.publish(1, perturbed_state)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"latest: version 1"):
        await asyncio.wait_for(wait_for_version(publisher.root, 2, timeout_s=0.2), timeout=5)
    assert 0.2 <= time.monotonic() - started < 4


def test_bfloat16_publishes_bfloat16_weights_and_config(tmp_path, tiny_model, perturbed_state, no_warnings_allowed):
    publisher = WeightPublisher(tmp_path / "weights", base_model_dir=tiny_model, dtype="bfloat16")
    path = publisher.publish(1, perturbed_state)
    publisher.close()
    written = published_tensors(path)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert all(torch.equal(written[name], t.to(torch.bfloat16)) for name, t in perturbed_state.items())
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tiny_model / "config.json").read_text())["dtype"] == "float32"  # the base is untouched
    with no_warnings_allowed():
        model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16


def test_make_publisher_and_its_config(tmp_path, tiny_model, perturbed_state):
    default_root = tmp_path / "run" / "weights"
    publisher = make_publisher(PublishConfig(keep_last=5), tiny_model, default_root)
    assert isinstance(publisher, WeightPublisher) and publisher.root == default_root and publisher.keep_last == 5
    publisher.close()
    shm_like = tmp_path / "shm" / "weights"
    publisher = make_publisher(PublishConfig(root=str(shm_like), dtype="float16"), tiny_model, default_root)
    assert publisher.root == shm_like and publisher.dtype == torch.float16
    publisher.close()

    with pytest.raises(NotImplementedError, match=r"needs GPUs.*backend: files.*/dev/shm"):
        make_publisher(PublishConfig(backend="nccl"), tiny_model, default_root)
    with pytest.raises(ValidationError, match="extra_forbidden"):
        PublishConfig(bakend="files")
    with pytest.raises(ValidationError):
        PublishConfig(every_steps=0)
    assert all(field.description for field in PublishConfig.model_fields.values())


def test_safetensors_parts_are_the_file_safetensors_writes():
    """The object-store backend ships a version as a header plus one buffer per tensor (no serialisation); written
    one after the other they are byte for byte the file safetensors itself writes, in every dtype a model has."""
    from safetensors.torch import save

    from trainer.publish import safetensors_parts

    tensors = {"b.weight": torch.randn(3, 5), "a.bias": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "d.half": torch.randn(2, 2).to(torch.float16), "mask": torch.tensor([True, False])}
    header, buffers = safetensors_parts(tensors, metadata={"format": "pt"})
    assert header + b"".join(bytes(b) for b in buffers) == save(tensors, metadata={"format": "pt"})
