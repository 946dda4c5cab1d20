"""The RL job behind `cwm-rl train`: one short loop (`driver.train_loop`) and one module per stage.

- `driver.py`: `run_job` (setup, loop, finish) and `train_loop`, the loop read top to bottom
- `run.py`: `Run`, the parts of one run, and `setup_run` (model, store, trainer, publisher, ...)
- `bootstrap.py`: the policy to start from: `model.path`, or a model made here and warm-started by SFT
- `tasks.py`: task sources per env (drawn, never reset), the weighted mix, the held-out split, cursors for resume
- `preflight.py`: engine configs the model cannot take, refused before any warm start, Ray or vLLM
- `cleanup.py`: the run's container label, and removing every container of a run
- `buffer.py`: finished groups waiting for the trainer (step token budget, backpressure)
- `signal_watch.py`: groups without a learning signal (zero advantage): why, metrics, when to stop
- `workers.py`: the Ray rollout worker actors: fill, collect, restarts, env-server replays, reloads
- `env_servers.py`: where each env is played (in-process, env servers started here or named by URL)
- `evaluation.py`: held-out greedy evaluation per env
- `sinks.py` and `progress.py`: console, metrics.jsonl, TensorBoard, W&B, summary.json, progress.png

Importing this package imports nothing heavy; torch, vLLM and Ray load when a run is set up.
"""
