"""``coordinator debug``: run the model live layer by layer and stop at the first divergence
(or ``--at NAME``) with a prompt: stats, top, replay, next/prev, continue, quit.

The workers start, are converted and stop exactly as in ``coordinator run`` (the debugger
runs as a step of ``runner.run``), so the run directory gets summary.json and report.html.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ..errors import ExitCode, LockstepError


@click.command("debug")
@click.option("--at", "at", default=None, metavar="NAME", help="stop at this layer (torch or paddle name) "
              "instead of the first divergent one")
@click.option("--backward", is_flag=True, help="also capture one backward pass (gradients) after the forward")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="run directory (default runs/debug-<time>)")
@click.option("--seed", default=0, show_default=True)
@click.option("--torch-model", default="minilm", show_default=True)
@click.option("--paddle-model", default="minilm", show_default=True)
@click.option("--model-path", default=None)
@click.option("--torch-path", multiple=True, metavar="DIR", help="put DIR first on the torch worker's sys.path")
@click.option("--paddle-path", multiple=True, metavar="DIR", help="put DIR first on the paddle worker's sys.path")
@click.option("--mapping", default=None, help="weight mapping TOML file or built-in name")
@click.option("--layer-map", default=None, type=click.Path(dir_okay=False), help="TOML overriding the layer pairing")
@click.option("--paddle-inject", multiple=True, help="deliberate porting bug (negative control), e.g. ln_eps:3:1e-5")
@click.option("--torch-inject", multiple=True)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE")
@click.option("--tolerance", "tolerances", multiple=True, metavar="STEP=METHOD:THRESHOLD",
              help="layers=rel:5e-6 (forward), layers.backward=rel:1e-4 (max|diff| / max|torch|)")
@click.option("--schedule", type=click.Choice(["auto", "parallel", "alternate"]), default="auto", show_default=True)
@click.option("--threads", default=0)
@click.option("--torch-device", default="cpu", show_default=True)
@click.option("--paddle-device", default="cpu", show_default=True)
@click.option("--no-create", is_flag=True, help="fail instead of building missing environments")
def command(**kw) -> None:
    """Step through the layers of both models interactively (plain prompts; scriptable via stdin)."""
    from ..cli import _parse_tolerances, _run_dir, _worker_specs
    from ..layerdebug import debug_step
    from ..params import coerce, resolve
    from ..runner import RunOptions, run

    def say(s: str) -> None:
        print(s, flush=True)
    try:
        from ..modelspec import check_specs
        check_specs(kw["torch_model"], kw["paddle_model"], kw["model_path"])
        over = {}
        for item in kw["params"]:
            key, sep, value = item.partition("=")
            if not sep:
                raise LockstepError(f"--param {item!r}: use KEY=VALUE")
            over[key] = coerce(key, value)
        if kw["layer_map"]:
            over["layer_map"] = str(Path(kw["layer_map"]).resolve())
        # files are checked before any worker starts, as `run` does (exit 2 naming the file)
        if kw["mapping"]:
            from ..mapping import WeightMap
            WeightMap.load(kw["mapping"])
        if over.get("layer_map"):
            from ..layermap import load_override
            load_override(over["layer_map"])
        # an --out that holds a run gets a fresh HHMMSS/ inside (as `run`): no report is overwritten
        out = _run_dir(Path(kw["out"]) if kw["out"] else Path("runs") / f"debug-{time.strftime('%Y%m%d-%H%M%S')}"
                       ).resolve()
        from ..placement import check_local_gpus
        check_local_gpus(kw["torch_device"], kw["paddle_device"])
        env_set = "auto"   # each worker's by its device
        opts = RunOptions(steps=["debug"], out=out, seed=kw["seed"], torch_model=kw["torch_model"],
                          paddle_model=kw["paddle_model"], model_path=kw["model_path"], mapping=kw["mapping"],
                          paddle_inject=list(kw["paddle_inject"]), torch_inject=list(kw["torch_inject"]),
                          params=resolve(over), tolerances=_parse_tolerances(kw["tolerances"]),
                          schedule=kw["schedule"], threads=kw["threads"], env_set=env_set,
                          torch_device=kw["torch_device"], paddle_device=kw["paddle_device"])
        opts.torch_path, opts.paddle_path = list(kw["torch_path"]), list(kw["paddle_path"])
        say(f"lockstep debug -> {out}")
        specs = _worker_specs(opts, kw["no_create"], say)
        code, summary = run(opts, specs, say, header={"options": {"out": str(out), "debug": True,
                                                                  "at": kw["at"], "backward": kw["backward"]}},
                            extra_steps={"debug": debug_step(kw["at"], kw["backward"])})
        say(f"debug session over: {ExitCode.DESCRIPTIONS.get(code, code)} (exit {code}; {out / 'report.html'})")
        sys.exit(code)
    except LockstepError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
