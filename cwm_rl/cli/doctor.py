"""`cwm-rl doctor`: what is installed (vLLM, Docker daemon, bubblewrap, Ray, ...) and how to get what is missing.

    cwm-rl doctor [--json] [--strict]
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cwm_rl.cli.common import console


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit 1 if anything is missing or broken.")] = False,
) -> None:
    """Show what is installed (vLLM, Docker daemon, bubblewrap, Ray, ...) and how to get what is missing."""
    from cwm_rl.doctor import diagnose

    findings = diagnose()
    if as_json:
        print(json.dumps([f.to_dict() for f in findings], indent=2))
    else:
        table = Table("component", "status", "detail", "fix")
        colour = {"ok": "green", "missing": "yellow", "broken": "red"}
        for f in findings:
            table.add_row(f.name, f"[{colour[f.status]}]{f.status}[/]", escape(f.detail), escape(f.fix))
        console.print(table)
    if strict and any(f.status != "ok" for f in findings):
        raise typer.Exit(1)
