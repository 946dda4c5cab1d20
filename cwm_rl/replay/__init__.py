"""Replay rollouts to debug them: re-step recorded actions in a fresh env and diff (`replay.py`),
recompute rewards with a changed env or verifier (`rescore.py`), regenerate from a recorded turn
(`branch.py`); their results are kept in `RUN_DIR/analysis.sqlite` (`results.py`), never in the
rollout store. Imports nothing heavy: `branch.py` imports vLLM only when it runs."""
