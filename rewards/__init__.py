"""Verifiers that turn model output into rewards: math answers (`math.py`, math-verify in the hard-timeout
process pool of `pool.py`), code tests (`code.py`), execution traces (`trace.py`) and SWE test grading
(`swe.py`, the pure parts). Imports no torch, vLLM or the trainer."""
