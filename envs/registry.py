"""Env registration through Gymnasium's registry, and lookup of text envs by id.

Built-in envs register under the `cwm_rl/` namespace with lazy "module:Class" entry points,
so `import envs; gymnasium.make("cwm_rl/Math-v0")` works and importing the registry costs
nothing. A user env registers the same way from its own module (`gymnasium.register(...)`);
`load_env_modules` imports such modules by name, and every module a package lists under the
`cwm_rl.envs` entry-point group, so the CLI and the env server can find them.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from importlib.metadata import entry_points
from typing import Any

import gymnasium as gym

from envs.base import TextEnv

NAMESPACE = "cwm_rl"
ENTRY_POINT_GROUP = "cwm_rl.envs"

BUILTIN_ENVS: dict[str, dict[str, Any]] = {
    f"{NAMESPACE}/Math-v0": {"entry_point": "envs.math_env:MathEnv"},
    f"{NAMESPACE}/Echo-v0": {"entry_point": "envs.echo_env:EchoEnv"},
    f"{NAMESPACE}/Code-v0": {"entry_point": "envs.code_env:CodeEnv"},
    f"{NAMESPACE}/Trace-v0": {"entry_point": "envs.trace_env:TraceEnv"},
    f"{NAMESPACE}/SWE-v0": {"entry_point": "envs.swe_env:SWEEnv"},
}


def register_builtin_envs() -> None:
    """Register the built-in envs (idempotent)."""
    for env_id, spec in BUILTIN_ENVS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, **spec)


def load_env_modules(modules: list[str] | tuple[str, ...] = (), from_cwd: bool = False) -> None:
    """Import env modules (which register their envs): the `cwm_rl.envs` entry points, then `modules`.
    `from_cwd`: also find `modules` in the current directory (as `--import my_envs` finds my_envs.py)."""
    if from_cwd and modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # a broken plugin must not hide the built-ins
            raise ImportError(f"env plugin {ep.name!r} ({ep.value}) failed to import: {e}") from e
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(
                f"cannot import env module {module!r}: {e}. Pass an importable module name "
                "(run from the directory that holds it, or install its package)."
            ) from e


def _entry(spec: gym.envs.registration.EnvSpec) -> Any:
    """What `spec.entry_point` names (a class or a factory), imported but not called; None for Gymnasium's own envs."""
    entry = spec.entry_point
    if isinstance(entry, str):
        if entry.startswith(("gymnasium.", "ale_py", "shimmy")):  # Gymnasium's own envs are not text envs
            return None
        module, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:  # a broken env is reported, not silently hidden
            raise ImportError(f"env {spec.id} cannot be loaded from {spec.entry_point!r}: {e}") from e
    return entry


def _is_text_env(spec: gym.envs.registration.EnvSpec) -> bool:
    entry = _entry(spec)
    return isinstance(entry, type) and issubclass(entry, TextEnv)


def text_env_class(env_id: str) -> type[TextEnv] | None:
    """The TextEnv class `make_env(env_id)` makes, without making one; None when a factory function makes it."""
    register_builtin_envs()
    entry = _entry(gym.spec(env_id))
    return entry if isinstance(entry, type) and issubclass(entry, TextEnv) else None


def list_text_envs() -> list[str]:
    """Ids of every registered env that is a `TextEnv`, sorted."""
    register_builtin_envs()
    return sorted(env_id for env_id, spec in gym.registry.items() if _is_text_env(spec))


def make_env(env_id: str, **kwargs: Any) -> TextEnv:
    """Make a registered text env by id, without Gymnasium's wrappers (the server and workers call it).

    Raises ValueError naming the known ids when `env_id` is unknown or not a text env.
    """
    register_builtin_envs()
    spec = gym.registry.get(env_id)
    if spec is None:
        raise ValueError(
            f"unknown env id {env_id!r}; registered text envs: {', '.join(list_text_envs())}. "
            "A user env must be registered by its module: import it first (CLI: --import MODULE)."
        )
    if not _is_text_env(spec):
        raise ValueError(f"{env_id} is not a cwm-rl text env (a subclass of envs.base.TextEnv)")
    if spec.max_episode_steps is not None or "max_episode_steps" in kwargs:
        raise ValueError(f"{env_id}: Gymnasium's max_episode_steps wrapper is not used for text envs; pass max_turns instead")
    try:
        return gym.make(env_id, disable_env_checker=True, **kwargs).unwrapped
    except TypeError as e:
        raise ValueError(f"bad arguments for {env_id}: {e}") from None


def describe_env(env_id: str) -> str:
    """First line of the env class's docstring (or its module's), without making the env."""
    spec = gym.registry.get(env_id)
    if spec is None:
        return "(not registered)"
    entry = spec.entry_point
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    doc = entry.__doc__ or sys.modules[entry.__module__].__doc__ or entry.__name__  # own docstring, not a base's
    return inspect.cleandoc(doc).splitlines()[0]
