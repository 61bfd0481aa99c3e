"""``coordinator map``: suggest a weight mapping for two models, or check a mapping file.

``map --suggest --torch-model pkg.mod:build --paddle-model pkg.mod:build > map.toml``
starts both workers, loads the models, pairs their parameters automatically
(``coordinator/automap.py``) and prints a mapping TOML to start from; the summary and
anything it could not pair go to stderr. ``map --check FILE`` converts the torch weights
with FILE and reports every problem (key and both shapes) without running anything else.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import click

from ..errors import ExitCode, LockstepError, UsageError


@click.command("map")
@click.option("--suggest", is_flag=True, help="print a suggested mapping TOML on stdout")
@click.option("--check", "check", default=None, metavar="FILE",
              help="convert the torch weights with this mapping and report every problem")
@click.option("--torch-model", required=True, help="preset (minilm, bert) or module.path:function")
@click.option("--paddle-model", required=True, help="preset (minilm, bert) or module.path:function")
@click.option("--model-path", default=None, help="checkpoint directory for the 'bert' preset")
@click.option("--torch-path", multiple=True, metavar="DIR", help="put DIR first on the torch worker's sys.path")
@click.option("--paddle-path", multiple=True, metavar="DIR", help="put DIR first on the paddle worker's sys.path")
@click.option("--registration-order", is_flag=True,
              help="pair modules in registration order (default: the order a forward pass calls them)")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=0, help="threads per worker (default: all cores, workers take turns)")
@click.option("--env-set", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--no-create", is_flag=True, help="fail instead of building missing environments")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="directory for the worker logs (default: a temporary directory)")
def command(**kw) -> None:
    """Suggest (--suggest) or check (--check FILE) the weight mapping between two models."""
    from ..cli import _console, print_remote_traceback
    console = _console()
    console.file = sys.stderr
    say = lambda s: console.print(s, markup=False, soft_wrap=True)  # noqa: E731  (stdout is the TOML)
    try:
        if kw["suggest"] == bool(kw["check"]):
            raise UsageError("map: give exactly one of --suggest or --check FILE")
        from ..modelspec import check_specs
        check_specs(kw["torch_model"], kw["paddle_model"], kw["model_path"])
        sys.exit(_map(kw, say))
    except LockstepError as exc:
        console.print(f"error: {exc}", markup=False, style="red", soft_wrap=True)
        print_remote_traceback(console, exc)
        console.print(f"exit {exc.exit_code}: {ExitCode.DESCRIPTIONS.get(exc.exit_code, '')}", markup=False)
        sys.exit(exc.exit_code)


def _map(kw: dict, say) -> int:
    if kw["check"]:   # a missing, malformed or misspelled file: exit 2 before any worker starts
        from ..mapping import WeightMap
        WeightMap.load(kw["check"])
    if kw["out"] is None:   # a temporary directory for the worker logs: kept only when something failed
        out = Path(tempfile.mkdtemp(prefix="lockstep-map-")).resolve()
        code = ExitCode.WORKER_ERROR
        try:
            code = _map_in(kw, say, out)
            return code
        finally:
            if code == ExitCode.ALIGNED:
                shutil.rmtree(out, ignore_errors=True)
            else:
                say(f"worker logs kept in {out}")
    out = kw["out"].resolve()
    out.mkdir(parents=True, exist_ok=True)
    return _map_in(kw, say, out)


def _map_in(kw: dict, say, out: Path) -> int:
    from ..cli import _worker_specs
    from ..modelspec import automatic_map, probe_inputs
    from ..runner import RunContext, RunOptions
    from ..session import Session
    from ..steps.common import ensure_converted, ensure_loaded
    opts = RunOptions(steps=[], out=out, seed=kw["seed"], torch_model=kw["torch_model"],
                      paddle_model=kw["paddle_model"], model_path=kw["model_path"], mapping=kw["check"],
                      threads=kw["threads"], env_set=kw["env_set"], schedule="alternate")
    opts.torch_path, opts.paddle_path = list(kw["torch_path"]), list(kw["paddle_path"])
    specs = _worker_specs(opts, kw["no_create"], say)
    with Session(out) as session:
        for spec in specs.values():
            session.launch(spec)
        say(f"starting workers (logs in {out}) ...")
        session.wait_hello()
        rc = RunContext(opts, session, say)
        rc.cache["schedule"] = "alternate"
        ensure_loaded(rc)
        if kw["check"]:
            converted = ensure_converted(rc)
            say(f"{kw['check']}: all {len(converted)} paddle tensors receive a torch tensor of the right shape")
            return ExitCode.ALIGNED
        found = automatic_map(rc, None if kw["registration_order"] else probe_inputs(rc))
        click.echo(found.to_toml(f"suggested by: coordinator map --suggest --torch-model {kw['torch_model']} "
                                 f"--paddle-model {kw['paddle_model']}"), nl=False)
        say(f"paired {len(found.pairs)} tensors by {found.order} order "
            f"({sum(1 for p in found.pairs if 'transpose' in p.ops)} transposed, "
            f"{len(found.ignored_torch)} torch entries ignored)")
        for note in found.order_notes:
            say(f"  note: {note}")
        for problem in found.problems():
            say(f"  not mapped: {problem}")
        return ExitCode.ALIGNED if found.complete else ExitCode.DIVERGED
