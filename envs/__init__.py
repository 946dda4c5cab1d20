"""Environments: the text-env API, the registry, the built-in envs (Math, Echo, Code, Trace, SWE), sandboxes, the env server and its client.

Importing this package registers the built-in envs with Gymnasium (`cwm_rl/Math-v0`, ...).
It never imports torch, vLLM or the trainer: an env server runs in a small container.
"""

from envs.base import SingleTurnEnv, TextEnv
from envs.registry import list_text_envs, load_env_modules, make_env, register_builtin_envs

register_builtin_envs()

__all__ = ["SingleTurnEnv", "TextEnv", "list_text_envs", "load_env_modules", "make_env", "register_builtin_envs"]
