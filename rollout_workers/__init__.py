"""Rollout workers: the vLLM engine wrapper with per-token policy versions and in-flight weight
reload (`engine.py`, vLLM internals only in `vllm_adapter.py`), the multi-turn agent loop
(`agent_loop.py`), the Ray actor (`actor.py`) and their configs (`config.py`, no vLLM import).
"""
