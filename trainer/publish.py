"""Weight publishing: the trainer hands each new policy version to the rollout workers as files.

`make_publisher(PublishConfig(), base_model_dir="models/tiny", root="runs/x/weights")` makes the
publisher; `publisher.publish(1, model.state_dict())` writes `runs/x/weights/v00000001` and
returns it; `latest_published("runs/x/weights")` is `(1, path)` from any process, and a rollout
worker reloads that path in place (`tests/trainer/test_publish.py`,
`tests/rollout_workers/test_publish_reload.py`).

Version N is a complete Hugging Face checkpoint directory, `root/v{N:08d}`: `model.safetensors`
plus the base model's config, generation config, tokenizer and chat template, so transformers
(`from_pretrained`) and vLLM (`reload_weights`, or a fresh `LLM(model=...)`) load it as it is.

Why it is built this way:
- A version is written into `root/.tmp-v{N}-{pid}` and renamed to `root/v{N:08d}` (atomic on one
  filesystem), then `root/LATEST` is replaced atomically: a worker never reads a half-written
  version. A publisher killed mid-write leaves a `.tmp-*` entry that the next one removes.
- The non-weight files do not change during a run, so they are copied once into `root/.static`
  and hard-linked into every version: a publish costs one safetensors write, no `save_pretrained`
  and no tokenizer save.
- `LATEST` is `{"version": N, "path": "v0000000N", "published_at": unix_seconds}`, the path
  relative to root so that a volume mounted elsewhere (another container) still resolves.
- Only the newest `keep_last` versions stay. Older ones are deleted on a background thread
  (deleting a just-written file costs as much as a third of its write on ext4); `close()` waits for
  it. A reader that already opened a pruned version's files can finish (Linux keeps unlinked files
  readable); one that has not should re-read LATEST.

One publisher per root (trainer rank 0). Versions must increase, also across restarts: a new
publisher reads the versions already under root. For workers on the same host, put root on
/dev/shm (a RAM filesystem).

For workers on other nodes with no shared path, `ObjectStorePublisher` (`publish.backend:
object_store`) puts each version into Ray's object store instead and returns a `ShippedWeights`;
a worker writes it into a directory of its own node (`rollout_workers/weights.py`) and reloads
that. `ship_model_dir` sends the base model the same way. The `nccl` backend (broadcast into GPU
workers) is not built yet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cwm_rl.types import ShippedWeights
from trainer.config import PublishConfig

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
LATEST_FILE = "LATEST"
STATIC_DIR = ".static"
TMP_PREFIX = ".tmp-"
VERSION_DIR = re.compile(r"v(\d{8,})")
# Files of a model directory that are weights or training state, never copied into a version.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
TRAINING_STATE_PREFIXES = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Subscriber = Callable[[int, Path], None]


class Publisher:
    """What both backends share: the base model's shapes and static files, and a state dict made into the
    tensors `save_pretrained` would write (checkpoint names, no tied aliases, the publish dtype)."""

    def __init__(self, *, base_model_dir: str | Path, keep_last: int = 3, dtype: torch.dtype | str | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: keep at least 1 published version")
        self.base_model_dir = Path(base_model_dir)
        if not (self.base_model_dir / "config.json").is_file():
            raise ValueError(f"base_model_dir {self.base_model_dir} has no config.json: pass the HF model dir the trainer loaded")
        self.keep_last = keep_last
        self.dtype = _resolve_dtype(dtype)
        self.latest_version: int | None = None
        self._closed = False
        self._model_config = json.loads((self.base_model_dir / "config.json").read_text())
        self._tie_word_embeddings = bool(self._model_config.get("tie_word_embeddings", False))
        self._expected_shapes = _checkpoint_shapes(self.base_model_dir)  # None if the base has no safetensors

    def _check_version(self, version: int, where: str) -> None:
        if self._closed:
            raise RuntimeError(f"the weights publisher for {where} is closed; make a new one to publish again")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        if self.latest_version is not None and version <= self.latest_version:
            raise ValueError(f"cannot publish weights version {version} to {where}: version {self.latest_version} "
                             f"is already published and versions must increase. Publish {(self.latest_version or 0) + 1} or "
                             "higher, or use a fresh publish root")

    def static_files(self) -> dict[str, bytes]:
        """The base dir's non-weight files (config, generation config, tokenizer, chat template), with config.json
        naming the publish dtype: a fresh vLLM engine takes its dtype from it."""
        files = {source.name: source.read_bytes() for source in sorted(self.base_model_dir.iterdir())
                 if source.is_file() and not _is_weight_or_training_state(source.name)}
        if self.dtype is not None:
            model_config = dict(self._model_config)
            dtype_name = str(self.dtype).removeprefix("torch.")
            model_config["dtype"] = dtype_name
            if "torch_dtype" in model_config:
                model_config["torch_dtype"] = dtype_name
            files["config.json"] = (json.dumps(model_config, indent=2, sort_keys=True) + "\n").encode()
        return files

    def _checkpoint_tensors(self, state: Mapping[str, torch.Tensor] | torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors `save_pretrained` would write: checkpoint names, no tied aliases, contiguous CPU copies."""
        if isinstance(state, torch.nn.Module):
            state = _module_state_dict(state)
        state = _strip_wrapper_prefixes(dict(state))
        expected = self._expected_shapes
        if self._tie_word_embeddings and "lm_head.weight" in state and (expected is None or "lm_head.weight" not in expected):
            del state["lm_head.weight"]  # tied to the input embeddings; save_pretrained does not write it
        if expected is not None:
            _drop_aliases_not_in(state, expected)
            mismatch = describe_mismatch({n: t.shape for n, t in state.items()}, expected, "state dict", "base model")
            if mismatch:
                raise ValueError(f"the weights to publish do not match the base model {self.base_model_dir}: {mismatch}. "
                                 "Pass the trained model, or its own state_dict(), of the base model's architecture")
        out = {}
        for name, tensor in state.items():
            tensor = tensor.detach()
            if self.dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
            out[name] = tensor.to("cpu").contiguous()
        return out


class WeightPublisher(Publisher):
    """Publishes policy versions under `root` as complete HF checkpoint dirs (see the module docstring)."""

    def __init__(self, root: str | Path, *, base_model_dir: str | Path, keep_last: int = 3, fsync: bool = False,
                 dtype: torch.dtype | str | None = None):
        super().__init__(base_model_dir=base_model_dir, keep_last=keep_last, dtype=dtype)
        self.root = Path(root)
        self.fsync = fsync
        self._subscribers: list[Subscriber] = []
        self._pruner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-prune")

        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(TMP_PREFIX + "*"):  # from a publisher that crashed mid-write
            _remove(leftover)
        self._static_files = self._copy_static_files()
        existing = [version for version, _ in _version_dirs(self.root)]
        latest = latest_published(self.root)
        known = existing + ([latest[0]] if latest else [])
        self.latest_version = max(known) if known else None

    def subscribe(self, callback: Subscriber) -> None:
        """Call `callback(version, path)` in this process after each publish (e.g. a local engine reload)."""
        self._subscribers.append(callback)

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor] | torch.nn.Module) -> Path:
        """Write `state_dict` (a model's `state_dict()`, or the model) as version `version`; returns its dir."""
        self._check_version(version, str(self.root))
        final = self.root / f"v{version:08d}"
        tensors = self._checkpoint_tensors(state_dict)

        tmp = self.root / f"{TMP_PREFIX}v{version}-{os.getpid()}"
        tmp.mkdir()
        try:
            save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            for static in self._static_files:
                _link_or_copy(static, tmp / static.name)
            if self.fsync:
                fsync_path(tmp / WEIGHTS_FILE)
                fsync_path(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.fsync:
            fsync_path(self.root)
        self._write_latest(version, final)
        self.latest_version = version
        self._pruner.submit(self._prune)
        for callback in self._subscribers:
            try:
                callback(version, final)
            except Exception:
                logger.exception("weights subscriber %r failed on version %d (%s); other subscribers still run", callback, version, final)
        return final

    def close(self) -> None:
        """Wait for pending deletions of old versions; the publisher cannot publish after this."""
        self._closed = True
        self._pruner.shutdown(wait=True)

    def _copy_static_files(self) -> list[Path]:
        """Write the base dir's non-weight files into root/.static once; every version hard-links them."""
        static = self.root / STATIC_DIR
        _remove(static)
        static.mkdir()
        for name, data in self.static_files().items():
            (static / name).write_bytes(data)
        return sorted(static.iterdir())

    def _write_latest(self, version: int, path: Path) -> None:
        tmp = self.root / f"{TMP_PREFIX}{LATEST_FILE}-{os.getpid()}"
        tmp.write_text(json.dumps({"version": version, "path": path.name, "published_at": time.time()}))
        if self.fsync:
            fsync_path(tmp)
        os.replace(tmp, self.root / LATEST_FILE)
        if self.fsync:
            fsync_path(self.root)

    def _prune(self) -> None:
        """Delete all but the newest `keep_last` versions (runs on the pruner thread)."""
        try:
            for _, path in _version_dirs(self.root)[:-self.keep_last]:
                shutil.rmtree(path)
        except OSError:
            logger.exception("could not delete old weights versions under %s", self.root)


class ObjectStorePublisher(Publisher):
    """Publishes each version into Ray's object store, for workers on any node of the cluster (no shared path).

    `publish(version, state_dict)` puts the weights into the object store once, as the parts of a safetensors
    file (`safetensors_parts`: its header, then each tensor's bytes as a numpy view, which Ray copies out of band
    with no serialisation; a worker writes them one after the other); it returns a `ShippedWeights` that the driver hands to every worker, which fetches it
    (from another node: Ray's object transfer) and writes it into a directory of its own (`rollout_workers/
    weights.py`). The config and tokenizer files are put once and shared by every version. This process owns
    the objects: the newest `keep_last` versions stay referenced here, so a worker that restarts can fetch the
    current one; older ones are freed. Needs `ray.init` (the trainer's Ray actor has it)."""

    def __init__(self, *, base_model_dir: str | Path, keep_last: int = 2, dtype: torch.dtype | str | None = None):
        import ray

        super().__init__(base_model_dir=base_model_dir, keep_last=keep_last, dtype=dtype)
        self._files = ray.put(self.static_files())
        self._kept: list[ShippedWeights] = []

    def publish(self, version: int, state_dict: Mapping[str, torch.Tensor] | torch.nn.Module) -> ShippedWeights:
        import ray

        self._check_version(version, "Ray's object store")
        header, buffers = safetensors_parts(self._checkpoint_tensors(state_dict), metadata={"format": "pt"})
        shipped = ShippedWeights(version=version, files=self._files, weights=ray.put({"header": header, "buffers": buffers}),
                                 nbytes=len(header) + sum(b.nbytes for b in buffers))
        self._kept = [*self._kept, shipped][-self.keep_last:]
        self.latest_version = version
        return shipped

    def close(self) -> None:
        self._closed = True
        self._kept = []


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_parts(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """(header, buffers): a safetensors file is `header` followed by the `buffers` (flat uint8 numpy views of the
    contiguous CPU tensors, no copy) in order; `safetensors.torch.load` reads it as `tensors`. The layout is the one
    safetensors writes itself: an 8-byte little-endian header size, the JSON header padded with spaces to 8 bytes,
    then the data (tensors by item size descending, then by name)."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, [tensors[n].reshape(-1).view(torch.uint8).numpy() for n in order]


def ship_model_dir(model_dir: str | Path, version: int = 0) -> ShippedWeights:
    """A whole HF model directory as one object (its weights included), e.g. the base model the workers start from
    when they share no filesystem with the driver. The caller keeps the result referenced while workers may need it."""
    import ray

    files = {p.name: p.read_bytes() for p in sorted(Path(model_dir).iterdir())
             if p.is_file() and not p.name.startswith(TRAINING_STATE_PREFIXES + (".",))}
    nbytes = sum(len(data) for name, data in files.items() if name.endswith(".safetensors"))
    return ShippedWeights(version=version, files=ray.put(files), nbytes=nbytes)


def make_publisher(config: PublishConfig, base_model_dir: str | Path, root: str | Path) -> WeightPublisher | ObjectStorePublisher:
    """The publisher `config` asks for. `root` is the default location (<run_dir>/weights); `config.root` overrides it."""
    if config.backend == "nccl":
        raise NotImplementedError(
            "publish.backend 'nccl' is not built yet: it needs GPUs and vLLM's weight-transfer engine to broadcast "
            "weights into the workers. Use publish.backend: files with publish.root on /dev/shm (e.g. "
            "/dev/shm/cwm-rl/<run>/weights) for fast same-host sync, or publish.backend: object_store across hosts")
    dtype = None if config.dtype == "auto" else config.dtype
    if config.backend == "object_store":
        return ObjectStorePublisher(base_model_dir=base_model_dir, keep_last=config.keep_last, dtype=dtype)
    return WeightPublisher(config.root or root, base_model_dir=base_model_dir, keep_last=config.keep_last,
                           fsync=config.fsync, dtype=dtype)


def latest_published(root: str | Path) -> tuple[int, Path] | None:
    """(version, dir) that root/LATEST points at, or None if nothing is published yet."""
    pointer = Path(root) / LATEST_FILE
    try:
        text = pointer.read_text()
    except FileNotFoundError:
        return None
    try:
        latest = json.loads(text)
        return int(latest["version"]), Path(root) / latest["path"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{pointer} is not a weights pointer ({e}); it should hold "
                         '{"version": N, "path": "v0000000N", "published_at": T}') from e


async def wait_for_version(root: str | Path, min_version: int, timeout_s: float, poll_s: float = 0.05) -> tuple[int, Path]:
    """Poll root/LATEST until a version >= `min_version` is published; TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        latest = latest_published(root)
        if latest is not None and latest[0] >= min_version:
            return latest
        if time.monotonic() >= deadline:
            seen = f"version {latest[0]}" if latest else "nothing"
            raise TimeoutError(f"no weights version >= {min_version} was published under {root} within {timeout_s} s "
                               f"(latest: {seen}); is the trainer running and publishing there?")
        await asyncio.sleep(poll_s)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _module_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's state dict under checkpoint names: undoes transformers' load-time weight conversions, if any."""
    model = unwrap_model(model)
    state = model.state_dict()
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        from transformers.core_model_loading import revert_weight_conversion  # what save_pretrained applies

        state = revert_weight_conversion(model, state)
    return state


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes a wrapped model's state dict has."""
    for prefix in ("module.", "_orig_mod.") * 2:  # twice: either wrapper may be outermost
        if state and all(name.startswith(prefix) for name in state):
            state = {name.removeprefix(prefix): tensor for name, tensor in state.items()}
    return state


def _drop_aliases_not_in(state: dict[str, torch.Tensor], expected: Mapping[str, object]) -> None:
    """Remove names outside `expected` whose tensor is an expected tensor under another name (tied weights)."""
    kept = {(t.data_ptr(), t.shape) for name, t in state.items() if name in expected}
    for name in [n for n, t in state.items() if n not in expected and (t.data_ptr(), t.shape) in kept]:
        del state[name]


def describe_mismatch(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                      found_label: str, expected_label: str) -> str | None:
    """What differs between two name -> shape maps (missing, extra, reshaped tensors), or None if they match."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    reshaped = [f"{name}: {found_label} {tuple(found[name])}, {expected_label} {tuple(expected[name])}"
                for name in sorted(set(found) & set(expected)) if tuple(found[name]) != tuple(expected[name])]
    problems = [f"{label} ({len(names)}): {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
                for label, names in ((f"not in the {found_label}", missing), (f"not in the {expected_label}", extra),
                                     ("shape mismatch", reshaped)) if names]
    return "; ".join(problems) or None


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from the safetensors headers in `model_dir` (no weights read), or None if there are none."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    shapes = {}
    for path in files:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _version_dirs(root: Path) -> list[tuple[int, Path]]:
    """Published version dirs under root, oldest first."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := VERSION_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def _is_weight_or_training_state(name: str) -> bool:
    return (name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json") or name.startswith(TRAINING_STATE_PREFIXES)
            or name.startswith("."))


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
