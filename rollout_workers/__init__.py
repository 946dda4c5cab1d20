"""Rollout workers: the vLLM engine wrapper, the multi-turn agent loop and in-flight weight reload (not built yet)."""
