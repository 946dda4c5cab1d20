"""`cwm-rl view RUN_DIR [--port 8686] [--host 127.0.0.1] [--open]`: the read-only live web viewer (docs/viewer.md).

RUN_DIR is a run directory (holding rollouts.sqlite) or a directory of them. The viewer listens on
127.0.0.1 only unless `--allow-remote` is given with another `--host`: it never writes, but what it
shows (prompts, model output, paths) is the run's, and it has no login. Bad input (no store, a store
from a newer cwm-rl, a busy port) raises the error `cwm_rl.cli.main` turns into one line.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import webbrowser
from pathlib import Path
from typing import Annotated

import typer

from cwm_rl.cli.common import say


def view(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (holding rollouts.sqlite), or a directory of run directories.")],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8686,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --allow-remote.")] = "127.0.0.1",
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a non-loopback --host (no login: anyone who "
                                                                       "reaches the port sees the run).")] = False,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in a web browser.")] = False,
) -> None:
    """Serve a live web page of a run: curves, trajectories with filters, token colours, groups, replay/rescore/branch results."""
    check_host(host, allow_remote)
    if not 0 < port < 65536:
        raise ValueError(f"--port {port} is not a TCP port; pick one in 1..65535 (default 8686)")
    check_port_free(host, port)

    import uvicorn

    from cwm_rl.viewer.app import make_app

    app = make_app(run_dir)  # a missing or unreadable store fails here, before anything listens
    if not allow_remote:  # answer only to loopback names: a web page cannot reach the run through DNS rebinding
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "::1", "[::1]", host])
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    say(f"cwm-rl viewer of {run_dir.resolve()} at {url} (read-only; Ctrl-C stops it)")
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")


def check_host(host: str, allow_remote: bool) -> None:
    """ValueError for a non-loopback address without --allow-remote."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ValueError(f"--host {host!r} is not an IP address; use 127.0.0.1 (the default) or an address of this "
                         "machine with --allow-remote") from None
    if not loopback and not allow_remote:
        raise ValueError(f"--host {host} would let other machines see this run (the viewer has no login); "
                         "add --allow-remote if that is intended, or keep the default 127.0.0.1")


def check_port_free(host: str, port: int) -> None:
    """ValueError naming --port when something already listens there (uvicorn would only log it and exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); pick another port with --port") from None
