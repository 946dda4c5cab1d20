"""Trajectories sampled from the tiny model with transformers, for trainer tests (no vLLM needed:
the behaviour logprobs are the sampler's own, so they match the trainer's up to float noise)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from cwm_rl.types import NO_VERSION, Trajectory, new_id


def sample_group(model, prompt_ids: list[int], *, group_size: int, max_new_tokens: int, reward: Callable[[list[int]], float],
                 generator: torch.Generator, version: int = 0, temperature: float = 1.0, task_id: str = "t") -> list[Trajectory]:
    """`group_size` completions of `prompt_ids` sampled token by token (the group as one batch), with their logprobs."""
    group_id = new_id()
    ids = torch.tensor([prompt_ids] * group_size)  # [G, T]
    logprobs = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            log_p = torch.log_softmax(model(input_ids=ids).logits[:, -1].float() / temperature, -1)  # [G, V]
            tokens = torch.multinomial(log_p.exp(), 1, generator=generator)  # [G, 1]
            logprobs.append(log_p.gather(-1, tokens))
            ids = torch.cat([ids, tokens], dim=1)
    logprobs = torch.cat(logprobs, dim=1).tolist()  # [G, max_new_tokens]
    n_prompt = len(prompt_ids)
    trajectories = []
    for i in range(group_size):
        generated = ids[i, n_prompt:].tolist()
        trajectories.append(Trajectory(
            task_id=task_id, env_id="test/Synthetic-v0", group_id=group_id, sample_index=i, token_ids=ids[i].tolist(),
            loss_mask=[0] * n_prompt + [1] * len(generated), logprobs=[0.0] * n_prompt + logprobs[i],
            policy_versions=[NO_VERSION] * n_prompt + [version] * len(generated), finish_reason="terminated",
            terminated=True, **{"return": reward(generated)}))
    return trajectories


@pytest.fixture
def sample_groups(tiny_model):
    """A function: (model, num_groups, ...) -> trajectories rewarded by the share of token ids below 200."""

    def make(model, *, num_groups: int = 3, group_size: int = 4, max_new_tokens: int = 6, seed: int = 0,
             version: int = 0, temperature: float = 1.0) -> list[Trajectory]:
        generator = torch.Generator().manual_seed(seed)
        out = []
        for g in range(num_groups):
            prompt = [0, 5 + g, 9, 11 + g]
            out += sample_group(model, prompt, group_size=group_size, max_new_tokens=max_new_tokens, generator=generator,
                                reward=lambda gen: sum(t < 200 for t in gen) / len(gen), version=version,
                                temperature=temperature, task_id=f"task-{g}")
        return out

    return make
