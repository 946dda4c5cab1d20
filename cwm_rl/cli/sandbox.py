"""`cwm-rl sandbox ...`: run one command the way model-written code runs (docs/sandbox.md).

    cwm-rl sandbox exec [--backend bwrap|docker] [--timeout S] [--memory-mb M] [--file NAME=PATH] [--stdin FILE] -- CMD...
    cwm-rl sandbox build-root [--docker]     # the Debian root (and its Docker image), once per machine
    cwm-rl sandbox reap [--all]              # remove sandbox containers whose owner process is gone
    cwm-rl sandbox reap --run RUN_DIR        # remove every container of one `cwm-rl train` run

`exec` prints the ExecResult as JSON (exit code, stdout/stderr excerpts, limits hit, timing) and
exits 0 whatever the program did: the JSON says how it ended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cwm_rl.cli.common import say

sandbox_app = typer.Typer(help="Run commands in the sandbox model-written code runs in.", no_args_is_help=True)


@sandbox_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sandbox_exec(
    command: Annotated[list[str], typer.Argument(help="The command and its arguments, after `--`.")],
    backend: Annotated[str, typer.Option(help="bwrap (bubblewrap) or docker.")] = "bwrap",
    timeout: Annotated[float, typer.Option("--timeout", help="Wall-clock seconds before the process tree is killed.")] = 10.0,
    cpu_s: Annotated[int, typer.Option("--cpu-s", help="CPU seconds per process.")] = 10,
    memory_mb: Annotated[int, typer.Option("--memory-mb", help="Memory per process (MiB).")] = 512,
    processes: Annotated[int, typer.Option(help="Processes and threads at once.")] = 64,
    disk_mb: Annotated[int, typer.Option("--disk-mb", help="Size of the work dir and of /tmp (MiB).")] = 128,
    output_bytes: Annotated[int, typer.Option("--output-bytes", help="Bytes kept per stream; more kills the program.")] = 1 << 20,
    excerpt: Annotated[int, typer.Option(help="Characters of stdout/stderr to print (the tail).")] = 2000,
    files: Annotated[list[str], typer.Option("--file", help="NAME=PATH: copy host file PATH into the work dir as NAME (repeatable).")] = [],
    stdin: Annotated[Path | None, typer.Option("--stdin", help="File whose bytes are the program's stdin.")] = None,
) -> None:
    """Run CMD in the sandbox and print the result as JSON."""
    from envs.sandbox import Limits, make_sandbox

    limits = Limits(timeout_s=timeout, cpu_s=cpu_s, memory_mb=memory_mb, processes=processes, disk_mb=disk_mb,
                    output_bytes=output_bytes)
    contents = {}
    for pair in files:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--file {pair!r} is not NAME=PATH (e.g. --file main.py=./solution.py)")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--file {pair!r}: {path} is not a file")
        contents[name] = Path(path).read_bytes()
    if stdin is not None and not stdin.is_file():
        raise FileNotFoundError(f"--stdin {stdin}: no such file")
    kwargs = {"pool_size": 0} if backend == "docker" else {}  # one run: no warm pool to fill
    with make_sandbox(backend, limits=limits, **kwargs) as sandbox:
        result = sandbox.run(command, files=contents, stdin=stdin.read_bytes() if stdin else None)
    out = result.model_dump()
    for stream in ("stdout", "stderr"):
        text = out[stream]
        out[stream] = text[-excerpt:] if excerpt and len(text) > excerpt else text
    out["wall_s"] = round(out["wall_s"], 4)
    print(json.dumps(out, indent=2))


@sandbox_app.command("build-root")
def build_root(
    with_docker: Annotated[bool, typer.Option("--docker", help="Also import it into Docker as the sandbox base image.")] = False,
) -> None:
    """Build the sandbox's Debian root with mmdebstrap (about a minute, once per machine; needs root)."""
    from envs.sandbox.rootfs import docker_base_image, sandbox_root

    root = sandbox_root(log=say)
    typer.echo(f"sandbox root: {root}")
    if with_docker:
        typer.echo(f"docker image: {docker_base_image(log=say)}")


@sandbox_app.command("reap")
def reap_containers(
    everything: Annotated[bool, typer.Option("--all", help="Remove every sandbox container, even live owners' ones.")] = False,
    run: Annotated[Path | None, typer.Option("--run", help="Remove every container of the `cwm-rl train` run in this run dir (its SWE and sandbox containers).")] = None,
) -> None:
    """Remove sandbox containers left by processes that are gone (crashes, kill -9), or every one of a run."""
    from envs.sandbox.docker import reap

    if run is not None:
        from cwm_rl.loop.cleanup import run_label

        if everything:
            raise ValueError("--run and --all do not go together: --run removes one run's containers, --all every one")

        typer.echo(json.dumps({"removed": reap(run_id=run_label(run))}))
        return
    typer.echo(json.dumps({"removed": reap(everything=everything)}))
