"""Core of cwm-rl: the shared types (`types.py`), the job config (`config.py`), the RL job (`loop/`),
the rollout store (`store.py`), the SFT warm start (`sft.py`), tiny models (`models/`) and the CLI
(`cli/`). Importing it, or the types, stays light: no torch, vLLM or Ray.
"""

__version__ = "0.1.0"
