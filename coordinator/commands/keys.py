"""``coordinator keys DIR``: CURVE keys for a coordinator and two remote workers."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("keys")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="replace keys that already exist in DIRECTORY")
def command(directory: Path, force: bool) -> None:
    """Write server.key, torch.key and paddle.key (each 0600) into DIRECTORY (made 0700 if new).

    server.key stays with `coordinator run --listen ... --curve-keys server.key`; copy
    torch.key and paddle.key (scp, never a chat or a command line) to the hosts that run
    `coordinator worker torch|paddle --connect ... --curve-keys FILE`. The coordinator
    admits exactly those two worker keys.
    """
    from ..errors import LockstepError
    from ..security import write_key_set
    try:
        paths = write_key_set(directory, force=force)
    except LockstepError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    for name, path in paths.items():
        who = "the coordinator (--listen ... --curve-keys)" if name == "server" else f"the {name} worker's host"
        click.echo(f"{path}  (0600) -> {who}")
