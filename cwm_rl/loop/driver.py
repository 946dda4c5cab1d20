"""`cwm-rl train`: the whole async RL loop, read top to bottom in `train_loop`.

`run_job(load_config("configs/quickstart.yaml"))` runs a job and returns its summary (the dict
written to summary.json); `tests/cwm_rl/loop/test_driver.py` runs whole jobs through `cwm-rl train`.
`run_job` sets the run up (`run.py`), runs `train_loop`, then `finish` (final eval, checkpoint,
summary.json, progress.png), and closes everything on every exit path. Ctrl-C stops after the
current step, cleanly; a second Ctrl-C exits at once. Each stage of the loop is one call into the
module that owns it:

| stage | module |
|---|---|
| tasks drawn per env, held-out split, cursors | `cwm_rl/loop/tasks.py` |
| rollout workers: fill, collect, restarts, env-server replays, reload | `cwm_rl/loop/workers.py` |
| store every trajectory (durable, queryable) | `cwm_rl/store.py` |
| buffer of finished groups (step budget, backpressure) | `cwm_rl/loop/buffer.py` |
| groups without a learning signal: warn, log, stop | `cwm_rl/loop/signal_watch.py` |
| trainer step (filters, advantages, loss, AdamW) on N Ray actors | `trainer/group.py`, `trainer/train.py` |
| publish the new version (HF checkpoint dir, or Ray's object store) | `trainer/publish.py` |
| held-out greedy eval | `cwm_rl/loop/evaluation.py` |
| console, metrics.jsonl, TensorBoard, W&B, summary, plot | `cwm_rl/loop/sinks.py` |
| where each step's time went (`time/*` metrics) | `cwm_rl/loop/timeline.py` |
"""

from __future__ import annotations

import errno
import math
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from cwm_rl.config import JobConfig
from cwm_rl.loop.evaluation import evaluate
from cwm_rl.loop.run import Run, check_run_dir, setup_run
from cwm_rl.loop.sinks import Sinks
from cwm_rl.loop.timeline import Timeline
from trainer.group import TrainerLost


def train_loop(run: Run) -> None:
    """The RL loop: keep workers busy, collect, store, buffer, step, publish -> reload, log, eval, checkpoint.
    Async mode steps the trainer in a thread of its own, so finished calls are replaced while it trains."""
    # The starting point is evaluated alone, before the RL clock starts (max_minutes and rl_s count RL only): played
    # beside the first groups, its requests waited in vLLM's queue behind all of them (the quickstart's: 3-4 s, alone
    # 1-2 s). Its phases go to a timeline of its own, dropped: the first step's timeline starts with RL.
    run.timeline, started = Timeline(), time.time()
    evaluate_and_log(run)
    run.rl_started, run.timeline = time.time(), Timeline()
    run.initial_eval_s = run.rl_started - started
    c, store, buffer, trainer, workers, timeline = run.config, run.store, run.buffer, run.trainer, run.workers, run.timeline
    run.stop_reason = run.stop_reason or _limit_reached(run)
    stepping: tuple[Future, list] | None = None  # (the trainer step running now, its batch)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer") as trainer_thread:
        while run.stop_reason is None or stepping is not None:  # a step under way is always finished
            run.endpoints.check()  # restart dead env servers, take back the ones answering again
            if run.stop_reason is None:
                fill(run)  # 1. every worker busy, unless the buffer is full (backpressure); sync: one round
            timeline.workers_busy(workers.in_flight_groups() > 0)
            # 2. Finished groups: stored first (nothing is lost), then buffered; groups that met a dead env server are played again.
            #    Waiting here with no step under way is the trainer idling for rollouts (the step timeline's `idle`).
            for request, trajectories in timeline.timed(workers.collect(timeout=0.2 if stepping is None else 0.05), "idle"):
                with timeline.phase("store"):
                    store.add(trajectories)
                timeline.add_rollouts(trajectories)
                good, unavailable = workers.requeue_unavailable(request, trajectories)
                if unavailable:
                    store.mark_dropped([t.trajectory_id for t in unavailable], "env_unavailable")
                buffer.add(good)
                run.signal_watch.add(good)  # groups without a learning signal: warn, log, decide to stop
                run.counts.trajectories_stored += len(trajectories)
                run.counts.trajectories_dropped_other += len(unavailable)
                run.counts.generated_tokens += sum(t.num_generated_tokens for t in trajectories)
            timeline.workers_busy(workers.in_flight_groups() > 0)  # sync: idle from here until the next round
            if workers.lost is not None:
                run.stop_reason = "rollout_workers_lost"
            elif run.signal_watch.stop:
                run.stop_reason = "no_learning_signal"
            # 3. The step under way, once done: publish -> reload, log, eval, checkpoint (`after_step`).
            if stepping is not None:
                future, batch = stepping
                if not future.done():
                    continue
                stepping = None
                finish_step(run, batch, future)
            if run.stop_reason is None:
                run.stop_reason = _limit_reached(run)  # steps or max_minutes
            if run.stop_reason is not None or not buffer.ready(c.trainer.batch.step_tokens, c.buffer_groups) \
                    or (c.mode == "sync" and workers.pending):
                continue
            # 4. A trainer step on the oldest groups (sync: all of them). Async: the workers may still be loading the last
            #    version; the step trains beside that, and the next publish waits for it.
            batch = buffer.take(c.trainer.batch.step_tokens if c.mode == "async" else math.inf)
            timeline.start_train()
            future = trainer_thread.submit(trainer.step, batch)
            if c.mode == "sync":  # the next round is played with the new weights
                finish_step(run, batch, future)
            else:
                stepping = (future, batch)


def fill(run: Run) -> None:
    """Give the workers groups: async, up to `buffer_groups` buffered or in flight; sync, one round."""
    c, workers = run.config, run.workers
    if c.mode == "async":
        workers.fill(run.tasks, budget=c.buffer_groups - len(run.buffer) - workers.in_flight_groups())
    else:
        workers.fill(run.tasks, budget=c.rollout.groups_per_request * len(workers), one_round=True)


def finish_step(run: Run, batch: list, step: Future) -> None:
    """`after_step` once the trainer step is done; a trainer rank that died stops the job (its batch stays
    stored as buffered: a resume trains on it)."""
    try:
        result = step.result()
        run.timeline.end_train()
        after_step(run, batch, result)
    except TrainerLost as e:
        run.stop_reason, run.trainer_lost = "trainer_lost", str(e)


def after_step(run: Run, batch: list, result: Any) -> None:
    """What follows a trainer step: record it, publish the new version (every worker reloads it in flight;
    sync: before it gets new work), log, and evaluate and checkpoint on schedule."""
    c, trainer, workers, timeline = run.config, run.trainer, run.workers, run.timeline
    with timeline.phase("store"):
        run.store.mark_step(result.metrics["step"], result.trained_ids, result.dropped_ids, result.records)
    _count_step(run, result)
    for warning in result.warnings:
        run.sinks.say(f"trainer: {warning}")
    if result.skipped:
        dropped = {k.removeprefix("dropped_"): v for k, v in result.metrics.items() if k.startswith("dropped_") and v}
        run.sinks.say(f"step skipped: none of {len(batch)} trajectories had a learning signal (dropped: {dropped})")
        return
    published = time.perf_counter()
    if trainer.step_count % c.publish.every_steps == 0:
        version = trainer.policy_version
        with timeline.phase("reload"):  # the last version loaded before a new one is published (which may prune it)
            workers.wait_reloads()
        with timeline.phase("publish"):
            weights = trainer.publish(version)
        with timeline.phase("reload"):  # async: sent (the next step trains while the workers load it); sync: waited for
            workers.reload(version, weights, wait=c.mode == "sync")
    result.metrics["publish_s"] = time.perf_counter() - published
    run.sinks.log_step({**result.metrics, **_loop_metrics(run, batch), **timeline.next_step()})
    last_eval_step = run.sinks.eval_history[-1]["step"]  # the loop evaluates before its first step
    if c.eval.every_steps and trainer.step_count - last_eval_step >= c.eval.every_steps:
        evaluate_and_log(run)  # counted in the next step's timeline, as is the checkpoint
    if c.checkpoint_every and trainer.step_count % c.checkpoint_every == 0:
        with timeline.phase("checkpoint"):
            run.checkpoint()


def _limit_reached(run: Run) -> str | None:
    c = run.config
    if run.trainer.step_count >= c.steps:
        return "steps"
    if c.max_minutes is not None and time.time() - run.rl_started > 60 * c.max_minutes:
        return "max_minutes"
    return None


def evaluate_and_log(run: Run) -> None:
    """Greedy accuracy on the held-out tasks of every env: stored (status eval) and logged."""
    run.sinks.set_status("evaluating")
    with run.timeline.phase("reload"):  # the eval plays the version it reports: the last one sent is loaded first
        run.workers.wait_reloads()
    with run.timeline.phase("eval"):
        result = evaluate(run.workers, run.endpoints, run.config, run.tasks.held_out, step=run.trainer.step_count,
                          policy_version=run.trainer.policy_version, say=run.sinks.say,
                          store=lambda trajectories: run.store.add(trajectories, status="eval"))
    run.sinks.log_eval(result)


def _count_step(run: Run, result: Any) -> None:
    run.counts.trajectories_trained += len(result.trained_ids)
    run.counts.trajectories_dropped_stale += len(result.dropped_ids.get("stale", []))
    run.counts.trajectories_dropped_other += sum(len(v) for k, v in result.dropped_ids.items() if k != "stale")


def _loop_metrics(run: Run, batch: list) -> dict[str, Any]:
    """What the loop knows about a step beyond the trainer: reward, buffer, throughput, wall time, learning signal."""
    now = time.time()
    return {"reward_mean": sum(t.return_ for t in batch) / max(len(batch), 1), "buffer_groups": len(run.buffer),
            "in_flight_groups": run.workers.pending_groups(), "generated_tokens": run.counts.generated_tokens,
            "tokens_per_s": run.counts.generated_tokens / max(now - run.rl_started, 1e-9), "wall_s": now - run.started,
            "rl_s": now - run.rl_started,
            **run.signal_watch.metrics()}


def finish(run: Run) -> dict[str, Any]:
    """Final eval, checkpoint, summary.json and the plot, once the loop has stopped (steps, max_minutes,
    Ctrl-C, lost workers or no learning signal); an exception skips it, and only `Run.close` runs then."""
    run.sinks.set_status(f"finishing ({run.stop_reason})")
    history = run.sinks.eval_history
    evaluated = history and history[-1]["step"] == run.trainer.step_count
    if run.stop_reason not in ("rollout_workers_lost", "trainer_lost") and not evaluated:  # lost workers cannot evaluate
        evaluate_and_log(run)
    if run.stop_reason != "trainer_lost":  # a dead trainer has nothing to save: its last checkpoint stands
        run.checkpoint()
    now = time.time()
    summary = {
        "stop_reason": run.stop_reason,
        "eval_accuracy_initial": history[0]["eval_accuracy"] if history else None,
        "eval_accuracy_final": history[-1]["eval_accuracy"] if history else None,
        "eval_accuracy_by_env": {spec.id: {"initial": history[0].get(f"eval_accuracy/{spec.id}"),
                                           "final": history[-1].get(f"eval_accuracy/{spec.id}")} for spec in run.config.envs} if history else {},
        "steps": run.trainer.step_count,
        "policy_versions": run.trainer.policy_version,
        **run.counts.to_dict(),
        "groups_replayed_env_unavailable": run.workers.groups_replayed,
        "rollout_worker_restarts": run.workers.restarts,
        "env_server_restarts": run.endpoints.restarts(),
        "wall_seconds": round(now - run.started, 1),
        "initial_eval_seconds": round(run.initial_eval_s, 1),  # wall = setup + this + RL (the final eval and checkpoint included)
        "rl_seconds": round(now - (run.rl_started or now), 1),
        "eval_history": history,
        "learning_signal": run.signal_watch.summary(),
        "model_dir": str(run.model_dir),
    }
    run.sinks.write_summary(summary)
    run.sinks.plot()
    return summary


def run_job(config: JobConfig, resume: bool = False) -> dict[str, Any]:
    """Run a whole job; Ctrl-C stops it cleanly (checkpoint, summary), a second Ctrl-C at once."""
    run_dir = check_run_dir(config, resume)
    run = Run(config, run_dir=run_dir, sinks=Sinks(config, run_dir), started=time.time())
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        if run.stop_reason == "interrupted":
            raise KeyboardInterrupt
        run.stop_reason = "interrupted"
        run.sinks.set_status("stopping")
        run.sinks.say("stopping after the current step (checkpoint, summary); Ctrl-C again to exit at once")

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        try:
            setup_run(run, resume)
            train_loop(run)
            summary = finish(run)
        except TrainerLost as e:  # outside a step (the final checkpoint): the same stop
            run.trainer_lost = str(e)
            raise RuntimeError(trainer_lost_message(run)) from e
        except Exception as e:
            if disk_full(e):  # what stands on disk is whole (atomic checkpoints, transactional store): say so
                raise RuntimeError(disk_full_message(run, e)) from e
            raise
        if run.stop_reason == "rollout_workers_lost":
            raise RuntimeError(f"{run.workers.lost}. The run is checkpointed at step {summary['steps']}; once the cause is fixed, "
                               f"continue it with: cwm-rl train --resume {run.run_dir}")
        if run.stop_reason == "trainer_lost":
            raise RuntimeError(trainer_lost_message(run))
        if run.stop_reason == "no_learning_signal":
            raise RuntimeError(f"{run.signal_watch.report()}\nThe run is checkpointed at step {summary['steps']}; once the cause "
                               f"is fixed, continue it with: cwm-rl train --resume {run.run_dir} (what to try: an SFT warm start, "
                               "model.sft.steps; easier tasks; a larger rollout.sampling.max_tokens; the answer format the env's "
                               "prompt asks for)")
        return summary
    finally:
        signal.signal(signal.SIGINT, previous)
        run.close()


def trainer_lost_message(run: Run) -> str:
    return f"{run.trainer_lost}. Every trajectory stored is kept; {resume_hint(run)}"


def resume_hint(run: Run) -> str:
    step = last_checkpoint_step(run)
    if step is None:
        return (f"the run has no checkpoint yet (checkpoint_every), so it cannot be resumed: start it again with a new "
                f"run_dir (its trajectories stay readable in {run.run_dir})")
    return f"the run is checkpointed at step {step}; continue it with: cwm-rl train --resume {run.run_dir}"


def last_checkpoint_step(run: Run) -> int | None:
    from trainer.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run.run_dir / "checkpoints")
    return int(latest.name.removeprefix("step_")) if latest is not None else None


def disk_full(error: BaseException) -> bool:
    """Is `error` (or what it wraps: a Ray task error's cause, an exception's __cause__) a full disk?"""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "disk is full" in str(e) or "No space left on device" in str(e):  # sqlite3; a rank's OSError via Ray
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return False


def disk_full_message(run: Run, error: BaseException) -> str:
    free = shutil.disk_usage(run.run_dir).free if run.run_dir.exists() else 0
    stored = run.counts.trajectories_stored
    return (f"the disk holding {run.run_dir} is full ({free / 2**20:.0f} MiB free; {type(error).__name__}: {error}). "
            f"The job stopped at step {run.trainer.step_count if run.trainer else 0}; every trajectory stored ({stored} "
            f"this start) and the checkpoints are intact. Free some space or move the run dir; {resume_hint(run)}")
