"""Benchmark the rollout worker: generated tokens/s of our agent loop vs raw `vllm.LLM.generate`.

In one run, on the same tiny model, prompts and sampling (temperature 1, a fixed number of
tokens per turn with EOS ignored, so both sides generate exactly the same amount), with both
engines up and the four workloads alternating for --rounds rounds (medians kept):
1. raw single-turn: `vllm.LLM.generate` on the rendered first prompts of 64 `cwm_rl/Echo-v0`
   episodes, `turns x max_tokens` tokens each, in one call;
2. raw multi-turn: the same 64 episodes played turn by turn with `vllm.LLM.generate` alone: each
   turn's prompts are the previous prompts + the sampled tokens + the Echo observation's tokens
   (rendered before the clock starts), one batched call per turn: what vLLM itself costs for
   the multi-turn workload (every turn re-submits and re-prefills its whole history);
3. ours, single-turn: 64 concurrent episodes of Echo with 1 round through `run_episode`
   (chat rendering, env step, Trajectory building) on a `RolloutEngine`;
4. ours, multi-turn: 64 concurrent Echo episodes of `turns` rounds of `max_tokens` each.

The ratios are ours / raw for the same workload. `multi_turn_ratio_vs_raw_single_turn` is also
printed: it mixes our overhead with vLLM's own cost of multi-turn (re-prefill per turn).

    .venv/bin/python bench/rollout.py [--model DIR] [--episodes 64] [--max-tokens 32] [--turns 4] [--rounds 3] [--executor inproc]

Goals (issue 3): single-turn >= 0.90 of raw, multi-turn >= 0.80. The last line printed is one
JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time


def prompts_for(model: str, num_episodes: int, turns: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """First prompts of `num_episodes` Echo episodes, and for each the observation tokens that
    follow each of its turns (Echo's next message does not depend on the action's text)."""
    from transformers import AutoTokenizer

    from cwm_rl.models.chat_template import detect_end_of_turn, render, render_delta
    from envs import make_env

    tok = AutoTokenizer.from_pretrained(model)
    end_of_turn = detect_end_of_turn(tok)
    firsts, observations = [], []
    for i in range(num_episodes):
        env = make_env("cwm_rl/Echo-v0", num_rounds=turns)
        messages, _ = env.reset(seed=i)
        firsts.append(tok.encode(render(tok, messages, add_generation_prompt=True), add_special_tokens=False))
        deltas = []
        for _ in range(turns - 1):
            messages = messages + [{"role": "assistant", "content": "x"}]
            observation = env.step("x")[0]
            # Our loop appends the end-of-turn token itself when a turn is cut off by max_tokens.
            delta = render_delta(tok, messages, observation, add_generation_prompt=True, end_of_turn=end_of_turn)
            deltas.append(tok.encode(end_of_turn + delta, add_special_tokens=False))
            messages = messages + observation
        observations.append(deltas)
    return firsts, observations


def start_raw(model: str, num_episodes: int, max_model_len: int):
    from vllm import LLM

    from rollout_workers.engine import cwm_as_llama_args

    # The same model code as ours (RolloutEngine's cwm_as_llama: vLLM's Llama for a CWM checkpoint), so the ratio is
    # what our loop adds, not which implementation vLLM picked.
    return LLM(model=model, dtype="float32", max_model_len=max_model_len, kv_cache_memory_bytes=2**28,
               max_num_seqs=num_episodes, enforce_eager=True, seed=0, **cwm_as_llama_args(model))


def raw_tokens_per_s(llm, prompts: list[list[int]], max_tokens: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def raw_multi_turn_tokens_per_s(llm, prompts: list[list[int]], observations: list[list[list[int]]], turns: int, per_turn: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=1.0, max_tokens=per_turn, ignore_eos=True, logprobs=0)
    histories = [list(p) for p in prompts]
    generated = 0
    started = time.perf_counter()
    for turn in range(turns):
        outputs = llm.generate([TokensPrompt(prompt_token_ids=h) for h in histories], params, use_tqdm=False)
        for i, o in enumerate(outputs):
            generated += len(o.outputs[0].token_ids)
            histories[i] += list(o.outputs[0].token_ids)
            if turn < turns - 1:
                histories[i] += observations[i][turn]
    elapsed = time.perf_counter() - started
    return generated / elapsed


async def ours_tokens_per_s(engine, num_episodes: int, rounds: int, per_turn: int, max_model_len: int) -> float:
    from envs import make_env
    from rollout_workers.agent_loop import run_episode
    from rollout_workers.config import EpisodeLimits, SamplingConfig

    sampling = SamplingConfig(temperature=1.0, max_tokens=per_turn, ignore_eos=True)
    limits = EpisodeLimits(max_turns=rounds, max_total_tokens=max_model_len)
    envs = [make_env("cwm_rl/Echo-v0", num_rounds=rounds) for _ in range(num_episodes)]
    started = time.perf_counter()
    trajs = await asyncio.gather(*(run_episode(engine, e, env_id="cwm_rl/Echo-v0", sampling=sampling, limits=limits, seed=i)
                                   for i, e in enumerate(envs)))
    elapsed = time.perf_counter() - started
    assert all(t.finish_reason == "terminated" for t in trajs), [t.finish_reason for t in trajs]
    return sum(t.num_generated_tokens for t in trajs) / elapsed


async def measure(model: str, prompts: list[list[int]], observations, args, max_model_len: int) -> dict[str, list[float]]:
    """Both engines stay up; the four workloads alternate for `args.rounds` rounds (drift hits all alike)."""
    from rollout_workers.config import EngineConfig
    from rollout_workers.engine import RolloutEngine
    from rollout_workers.vllm_adapter import shutdown_offline_llm

    llm = start_raw(model, len(prompts), max_model_len)
    engine = RolloutEngine(EngineConfig(model=model, max_model_len=max_model_len, kv_cache_gib=0.25, max_num_seqs=len(prompts),
                                        executor=args.executor))
    tokens = args.max_tokens * args.turns
    figures: dict[str, list[float]] = {"raw": [], "raw_multi_turn": [], "single_turn": [], "multi_turn": []}
    try:
        raw_tokens_per_s(llm, prompts[:4], 8)  # warm-ups
        await ours_tokens_per_s(engine, 4, args.turns, 8, max_model_len)
        for _ in range(args.rounds):
            figures["raw"].append(raw_tokens_per_s(llm, prompts, tokens))
            figures["raw_multi_turn"].append(raw_multi_turn_tokens_per_s(llm, prompts, observations, args.turns, args.max_tokens))
            figures["single_turn"].append(await ours_tokens_per_s(engine, len(prompts), 1, tokens, max_model_len))
            figures["multi_turn"].append(await ours_tokens_per_s(engine, len(prompts), args.turns, args.max_tokens, max_model_len))
            print("round:", {k: round(v[-1]) for k, v in figures.items()}, file=sys.stderr)
    finally:
        engine.shutdown()
        shutdown_offline_llm(llm)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Model directory; default: a fresh `tiny` model in a temp dir.")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens per turn (multi-turn); single-turn generates turns x this.")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds of the three workloads; medians are kept.")
    parser.add_argument("--executor", default="auto", choices=["auto", "uni", "mp", "inproc"],
                        help="Our engine's rollout.engine.executor (the quickstart's: inproc); the raw engine is vLLM's default.")
    args = parser.parse_args()
    max_model_len = 1024

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from cwm_rl.models import init_model

            model = str(init_model(f"{tmp}/tiny", preset="tiny", seed=0))
        prompts, observations = prompts_for(model, args.episodes, args.turns)
        figures = asyncio.run(measure(model, prompts, observations, args, max_model_len))
    med = {k: statistics.median(v) for k, v in figures.items()}
    from rollout_workers.engine import resolved_executor

    print(json.dumps({
        "bench": "rollout",
        "episodes": args.episodes,
        "tokens_per_episode": args.max_tokens * args.turns,
        "turns_multi_turn": args.turns,
        "raw_vllm_tokens_per_s": round(med["raw"], 1),
        "raw_vllm_multi_turn_tokens_per_s": round(med["raw_multi_turn"], 1),
        "single_turn_tokens_per_s": round(med["single_turn"], 1),
        "multi_turn_tokens_per_s": round(med["multi_turn"], 1),
        "single_turn_ratio_vs_raw": round(med["single_turn"] / med["raw"], 3),
        "multi_turn_ratio_vs_raw": round(med["multi_turn"] / med["raw_multi_turn"], 3),
        "multi_turn_ratio_vs_raw_single_turn": round(med["multi_turn"] / med["raw"], 3),
        "rounds": args.rounds,
        "executor": resolved_executor(args.executor),  # what "auto" stood for on this machine
        "goal_single_turn_ratio": 0.9,
        "goal_multi_turn_ratio": 0.8,
    }))


if __name__ == "__main__":
    main()
