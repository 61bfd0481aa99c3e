"""``coordinator``: the command line. Heavy modules load lazily so ``--help`` is instant."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from .errors import ExitCode, LockstepError, UsageError


def _console():
    """Rich output; into a file or a CI log (not a terminal) 160 columns wide instead of rich's
    80, so tables keep their notes. Plain lines are never wrapped (``soft_wrap``): paths, keys
    and layer names stay whole for grep. No emoji codes: ``:smile:`` in a user's sentence or
    ``x:0:`` in a file is quoted as written."""
    from rich.console import Console
    return Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 160)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """lockstep: prove a PyTorch -> PaddlePaddle migration behaves like the original.

    Each framework runs in its own environment and process; the coordinator drives
    both in lockstep over ZeroMQ and diffs tensors as they arrive.
    """
    from .placement import tune_own_malloc
    tune_own_malloc()  # comparisons reuse their chunk buffers' pages (docs/remote-and-gpu.md)


# -- envs --------------------------------------------------------------------------------
@main.group()
def envs() -> None:
    """Build and inspect the worker environments."""


@envs.command("create")
@click.argument("names", nargs=-1, metavar="[torch] [paddle]")
@click.option("--env-set", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="rebuild even if the environment exists")
def envs_create(names: tuple[str, ...], env_set: str, force: bool) -> None:
    """Create the torch and paddle environments (default: both; idempotent). They are cached in
    $LOCKSTEP_ENV_DIR (default ~/.cache/lockstep/envs), keyed by the hash of envs/<name>-<set>.txt."""
    from . import envs as E
    try:
        for name in names or tuple(E.WORKERS):
            spec = E.env_spec(name, env_set)
            took = E.create(spec, force=force, progress=lambda s: click.echo(s))
            if not took:
                click.echo(f"[{name}] already built: {spec.python}")
    except LockstepError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:   # Ctrl-C or SIGTERM: the half-built environment was removed
        click.echo("interrupted: nothing half-built was left behind; run it again to build", err=True)
        sys.exit(ExitCode.INTERRUPTED)


@envs.command("check")
@click.option("--env-set", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
def envs_check(env_set: str) -> None:
    """Print each environment's interpreter, framework versions and devices."""
    from . import envs as E
    code = 0
    for name in E.WORKERS:
        spec = E.env_spec(name, env_set)
        try:
            info = E.check(spec)
            click.echo(f"{name}: {info.pop('interpreter')}")
            for k, v in info.items():
                click.echo(f"  {k}: {v}")
        except LockstepError as exc:
            click.echo(f"{name}: {exc}", err=True)
            code = exc.exit_code
    sys.exit(code)


# -- run ---------------------------------------------------------------------------------
def _parse_steps_all(text: str) -> tuple[list[str], bool]:
    """The step names, and whether they came from ``all`` (every step that exists)."""
    from .steps import STEPS
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STEPS and s != "all"]
    if not names:
        raise UsageError(f"--steps {text!r}: no step given (known: {', '.join(STEPS)}, all)")
    if unknown:  # before anything is created: no empty run directory for a typo
        raise UsageError(f"unknown step(s) {', '.join(unknown)} (known: {', '.join(STEPS)}, all)")
    if "all" in names:
        return list(STEPS), True
    return names, False


def _unsupported(steps: list[str], from_all: bool, kw: dict) -> dict[str, str]:
    """Steps the models cannot do: to skip (said, and kept in summary.json) under ``--steps all``;
    refused with exit 2, before anything is created, when asked for by name."""
    from types import SimpleNamespace

    from .modelspec import unsupported_steps
    skip = unsupported_steps(SimpleNamespace(torch_model=kw["torch_model"], paddle_model=kw["paddle_model"]), steps)
    if skip and not from_all:
        name, why = next(iter(skip.items()))
        raise UsageError(f"step {name!r} cannot run on this model: {why} (docs/own-model.md lists the steps "
                         f"a factory model supports)")
    return skip


def _worker_specs(opts, no_create: bool, say) -> dict:
    from . import envs as E
    from .placement import worker_env
    from .runner import choose_schedule, worker_threads
    from .session import WorkerSpec
    specs = {}
    cores = os.cpu_count() or 1
    schedule, _ = choose_schedule(opts.schedule, opts.torch_device, opts.paddle_device, cores)
    threads = worker_threads(schedule, cores, opts.threads)  # parallel on CPU: the cores are split
    devices = {"torch": opts.torch_device, "paddle": opts.paddle_device}
    managed = {name: E.env_spec(name, opts.env_set if opts.env_set != "auto" else
                                ("cpu" if device == "cpu" else "gpu"))
               for name, device in devices.items() if not os.environ.get(f"LOCKSTEP_WORKER_ARGV_{name.upper()}")}
    if no_create:   # every missing environment named at once, not one per attempt
        missing = [spec for spec in managed.values() if not spec.ready()]
        if len(missing) > 1:
            raise E.EnvironmentProblem("the torch and paddle environments are not built (" + ", ".join(
                f"{s.name} ({s.env_set}) at {s.path}" for s in missing) + "); run: " +
                "; ".join(s.fix_command() for s in missing))
    for name in ("torch", "paddle"):
        override = os.environ.get(f"LOCKSTEP_WORKER_ARGV_{name.upper()}")
        env = worker_env(name, devices[name], threads[name])
        if override:
            argv = json.loads(override)
        else:
            spec = managed[name]
            if not spec.ready():
                if no_create:
                    E.require_ready(spec)
                say(f"the {name} environment is not built yet: creating it (one time, a few minutes)")
                E.create(spec, progress=say)
            site = E.worker_site(opts.out, spec.worker_package)
            env["PYTHONPATH"] = str(site)
            argv = [str(spec.python), "-m", spec.worker_package]
        fix = (f"LOCKSTEP_WORKER_ARGV_{name.upper()} chooses this worker's command: check it" if override else
               f"rebuild the {name} environment: coordinator envs create {name} --force")
        specs[name] = WorkerSpec(name, argv, env, framework=name, fix=fix)
    return specs


def _listen_keys(kw, say) -> dict | None:
    """``--listen``: refuse plaintext TCP off the host unless --insecure; load the server keys (never logged)."""
    from .security import check_transport, load_server_keys
    if not kw["listen"]:
        if kw["curve_keys"] or kw["insecure"]:
            raise UsageError("--curve-keys and --insecure only apply with --listen (local workers use a private "
                             "ipc socket)")
        return None
    warning = check_transport(kw["listen"], bool(kw["curve_keys"]), kw["insecure"], "--listen")
    if warning:
        say(warning)
    return load_server_keys(kw["curve_keys"]) if kw["curve_keys"] else None


def _remote_specs() -> dict:
    """Workers started elsewhere: nothing to launch, only the framework their HELLO must name."""
    from .session import WorkerSpec
    return {name: WorkerSpec(name, [], {}, framework=name,
                             fix=f"start it on its host: coordinator worker {name} --connect tcp://HOST:PORT "
                                 f"[--curve-keys {name}.key]")
            for name in ("torch", "paddle")}


def _device_env(name: str, device: str) -> dict[str, str]:
    """Pin a local worker to one GPU: it sees only that device, as its device 0 (see placement.py)."""
    from .placement import device_env
    return device_env(name, device)


@main.command()
@click.option("--steps", default="all", show_default=True, help="comma list of steps, or 'all'")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="run directory (default runs/<timestamp>)")
@click.option("--seed", default=0, show_default=True)
@click.option("--torch-model", default="minilm", show_default=True,
              help="preset (minilm, bert) or your factory module.path:function (docs/own-model.md)")
@click.option("--paddle-model", default="minilm", show_default=True,
              help="preset (minilm, bert) or your factory module.path:function")
@click.option("--model-path", default=None, help="checkpoint directory for the 'bert' preset")
@click.option("--torch-path", multiple=True, metavar="DIR", help="put DIR first on the torch worker's sys.path "
              "before importing a factory (repeatable; the current directory is always searched)")
@click.option("--paddle-path", multiple=True, metavar="DIR", help="the same for the paddle worker")
@click.option("--mapping", default=None, help="weight mapping TOML file or built-in name (default: bert for "
              "presets, automatic for factories)")
@click.option("--paddle-inject", multiple=True, help="deliberate porting bug for a negative control, "
              "e.g. ln_eps:3:1e-5, gelu_tanh:2")
@click.option("--torch-inject", multiple=True, help="deliberate bug on the torch side (negative controls)")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="your own TSV (sentence<TAB>label, header) instead of the demo set")
@click.option("--lr", type=float, default=None, help="learning rate of the lr and backward steps (default 3e-5, the guide's); "
              "train and perf use --param train_lr (default 5e-5)")
@click.option("--warmup", type=int, default=None, help="warmup steps for the lr step (default 345)")
@click.option("--total-steps", type=int, default=None, help="schedule length for the lr step (default 1024)")
@click.option("--iters", type=int, default=None, help="backward iterations (default 10)")
@click.option("--epochs", type=int, default=None, help="train epochs (default 1)")
@click.option("--batch-size", type=int, default=None, help="batch size (default 4)")
@click.option("--dropout", type=click.Choice(["off", "shared"]), default=None,
              help="backward/train: dropout off (default) or on with masks shared by both sides")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="any step parameter (see docs)")
@click.option("--tolerance", "tolerances", multiple=True, metavar="STEP=METHOD:THRESHOLD",
              help="per-step tolerance (METHOD max, mean or min of |diff|, or rel: max|diff| / max|torch|), "
                   "e.g. forward=max:1e-5, loss=mean:1e-6, backward.grad=rel:1e-4, layers=rel:5e-6")
@click.option("--stop-at-first", is_flag=True, help="layers: end at the first divergent layer")
@click.option("--forward-threshold", type=float, default=None, help="forward tolerance (default 1e-5)")
@click.option("--diff-method", type=click.Choice(["max", "mean"]), default=None,
              help="statistic for the forward verdict (default max)")
@click.option("--schedule", type=click.Choice(["auto", "parallel", "alternate"]), default="auto", show_default=True)
@click.option("--threads", default=0, help="threads per worker (default: all cores when the workers take "
              "turns, half each when they run in parallel)")
@click.option("--env-set", type=click.Choice(["cpu", "gpu"]), default=None, help="worker environments: cpu or gpu builds (default: each worker's by its device)")
@click.option("--torch-device", default="cpu", show_default=True, help="cpu or cuda:N")
@click.option("--paddle-device", default="cpu", show_default=True, help="cpu or gpu:N")
@click.option("--allow-shared-gpu", is_flag=True, help="let both workers use the same GPU")
@click.option("--fail-fast", is_flag=True, help="stop at the first failing step")
@click.option("--no-create", is_flag=True, help="fail instead of building missing environments")
@click.option("--timeout", type=float, default=None, help="per-op deadline in seconds (default generous per op)")
@click.option("--hello-timeout", type=float, default=None, help="seconds a worker may take to start (default 120)")
@click.option("--listen", default=None, metavar="tcp://ADDR:PORT",
              help="do not launch workers: bind here and wait for `coordinator worker` on other hosts")
@click.option("--curve-keys", default=None, metavar="FILE|-",
              help="with --listen: server.key from `coordinator keys` (0600), or '-' for stdin")
@click.option("--insecure", is_flag=True, help="with --listen: allow a non-loopback address without keys")
@click.option("--interrupt-grace", type=float, default=10.0, show_default=True,
              help="after Ctrl-C, seconds the op in flight may take to finish")
def run(**kw) -> None:
    """Drive both workers through the steps in lockstep; exit 0 when aligned."""
    from .compare import Tolerance
    from .runner import RunOptions
    from .runner import run as do_run

    console = _console()
    say = lambda s: console.print(s, markup=False, soft_wrap=True)  # noqa: E731
    try:
        steps, from_all = _parse_steps_all(kw["steps"])
        from .modelspec import check_specs
        check_specs(kw["torch_model"], kw["paddle_model"], kw["model_path"])
        skipped = _unsupported(steps, from_all, kw)
        steps = [s for s in steps if s not in skipped]
        tol = {}
        given = _parse_tolerances(kw["tolerances"])
        if "forward" in given and (kw["forward_threshold"] is not None or kw["diff_method"]):
            raise UsageError("--forward-threshold/--diff-method and --tolerance forward=... both set the forward "
                             "tolerance: give one")
        if kw["forward_threshold"] is not None or kw["diff_method"]:
            tol["forward"] = Tolerance(kw["forward_threshold"] if kw["forward_threshold"] is not None else 1e-5,
                                       kw["diff_method"] or "max")
        tol.update(given)
        params = _parse_params(kw)
        from .tsv import read_tsv, require_batches
        for key in ("data", "dev_data"):   # a bad --data / dev_data file (file:line: reason) before workers start
            if params.get(key):
                split = read_tsv(params[key], key)
                if key == "data" and ("data" in steps or "train" in steps):
                    require_batches(split, int(params["batch_size"]))   # too few rows for one batch
        if kw["mapping"]:
            from .mapping import WeightMap
            WeightMap.load(kw["mapping"])  # likewise a missing, malformed or misspelled mapping file
        if params.get("layer_map"):
            from .layermap import load_override
            load_override(params["layer_map"])   # and the layers step's override file
        _check_devices(kw["torch_device"], kw["paddle_device"], kw["allow_shared_gpu"])
        if kw["listen"] and (kw["torch_device"], kw["paddle_device"]) != ("cpu", "cpu"):
            raise UsageError("--torch-device/--paddle-device choose local workers' devices; with --listen each "
                             "remote worker picks its own: coordinator worker torch --device cuda:N (or paddle "
                             "--device gpu:N) on its host")
        if not kw["listen"]:
            from .placement import check_local_gpus
            check_local_gpus(kw["torch_device"], kw["paddle_device"])
        server_curve = _listen_keys(kw, say)
        env_set = kw["env_set"] or "auto"   # auto: each worker's by its device (_worker_specs)
        deadlines = {"*": kw["timeout"]} if kw["timeout"] else {}  # every op (session.DEFAULT_DEADLINES)
        if kw["hello_timeout"]:
            deadlines["hello"] = kw["hello_timeout"]
        out = _run_dir(kw["out"])   # last: nothing is created for a command line refused above
        opts = RunOptions(steps=steps, out=out.resolve(), seed=kw["seed"], torch_model=kw["torch_model"],
                          paddle_model=kw["paddle_model"], model_path=kw["model_path"], mapping=kw["mapping"],
                          paddle_inject=list(kw["paddle_inject"]), torch_inject=list(kw["torch_inject"]),
                          stop_at_first=kw["stop_at_first"], params=params, tolerances=tol, schedule=kw["schedule"],
                          threads=kw["threads"], env_set=env_set, torch_device=kw["torch_device"],
                          paddle_device=kw["paddle_device"], fail_fast=kw["fail_fast"], deadlines=deadlines)
        opts.interrupt_grace = kw["interrupt_grace"]
        opts.params_given = _given_params(kw)
        opts.listen, opts.allow_shared_gpu = kw["listen"], kw["allow_shared_gpu"]
        opts.torch_path, opts.paddle_path = list(kw["torch_path"]), list(kw["paddle_path"])
        say(f"lockstep run -> {opts.out}")
        for name, why in skipped.items():
            say(f"step {name} skipped: {why}")
        specs = _remote_specs() if opts.listen else _worker_specs(opts, kw["no_create"], say)
        header = {"options": _options_json(opts)}
        if skipped:
            header["steps_skipped"] = skipped
        code, summary = do_run(opts, specs, say, header=header, server_curve=server_curve)
        _print_table(console, summary.data)
        say(f"verdict: {ExitCode.DESCRIPTIONS.get(code, code)}  (exit {code}; {opts.out / 'report.html'})")
        sys.exit(code)
    except LockstepError as exc:
        console.print(f"error: {exc}", markup=False, style="red", soft_wrap=True)  # paths and keys stay whole
        print_remote_traceback(console, exc)
        console.print(f"exit {exc.exit_code}: {ExitCode.DESCRIPTIONS.get(exc.exit_code, '')}", markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)


def print_remote_traceback(console, exc: BaseException) -> None:
    """A WorkerFailed carries the worker's own traceback (e.g. a factory that cannot be imported): show it."""
    tb = getattr(getattr(exc, "remote", None), "traceback", "")
    if tb:
        console.print(f"--- {exc.remote.worker} worker traceback (op {exc.remote.op!r}) ---\n{tb.rstrip()}",
                      markup=False, soft_wrap=True)


def _run_dir(given: Path | None) -> Path:
    """``--out`` (a directory that already holds a run gets a fresh ``HHMMSS`` one inside it,
    so no report is overwritten), else ``runs/<timestamp>``; made now, so that a path that
    cannot be a directory is a usage error naming it before any worker starts."""
    try:
        out = given if given is not None else Path("runs")
        if ":" in str(out.absolute()):   # the workers import lockstep from <run>/.site via PYTHONPATH
            what = f"--out {out}" if given is not None else f"the default run directory {out.absolute()}"
            raise UsageError(f"{what}: a run directory's path cannot hold ':' (PYTHONPATH's separator: "
                             f"the workers import lockstep's packages from inside it); choose another name"
                             + ("" if given is not None else " with --out DIR, or run from another directory"))
        if given is None:
            return _fresh_run_dir(out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory")
        if out.is_dir() and (out / "summary.json").exists():
            out = out / time.strftime("%H%M%S")
        out.mkdir(parents=True, exist_ok=True)
        return out
    except OSError as exc:
        where = given if given is not None else Path("runs").absolute()
        raise UsageError(f"--out {where}: cannot create the run directory ({exc.strerror or exc})") from None


def _fresh_run_dir(base: Path) -> Path:
    """runs/<timestamp>, made atomically: two runs started in the same second get different ones."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        path = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise LockstepError(f"cannot create a fresh run directory under {base}")


def _parse_tolerances(items) -> dict:
    from .compare import Tolerance
    out = {}
    for item in items:
        step, _, rest = item.partition("=")
        method, _, thr = rest.partition(":")
        if not step or method not in ("max", "mean", "min", "rel"):
            raise UsageError(f"--tolerance {item!r}: use STEP=max:1e-5 (method max, mean or min: of |torch - "
                             f"paddle|; rel: max|torch - paddle| / max|torch|)")
        if step.split(".")[0] == "layers" and method not in ("rel", "max"):
            raise UsageError(f"--tolerance {item!r}: the layers step judges every tensor relative to its own "
                             f"size (max|diff| / max|torch|): use {step}=rel:T")
        try:
            out[step] = Tolerance(float(thr), method)
        except ValueError:
            raise UsageError(f"--tolerance {item!r}: threshold {thr!r} is not a number") from None
        known = _tolerance_keys()
        if step not in known:
            raise UsageError(f"--tolerance {item!r}: no step or sub-check {step!r} (known: {', '.join(known)})")
    return out


def _tolerance_keys() -> list[str]:
    """What ``--tolerance KEY=...`` accepts: every step that reads one, and the sub-checks that have
    their own (weights must round-trip exactly; perf's verdict is ``--param perf_ratio``)."""
    from .steps import STEPS, backward, lr
    return [s for s in STEPS if s not in ("weights", "perf")] + [f"backward.{k}" for k in backward.DEFAULTS] + \
        ["layers.backward"] + \
        [f"lr.{k}" for k in lr.DEFAULTS]


def _parse_params(kw) -> dict:
    from .params import check, coerce, resolve
    over = {}
    for k in OPTION_PARAMS:   # --lr X is --param lr=X: the same checks
        try:
            over[k] = check(k, kw[k])
        except UsageError as exc:
            raise UsageError(f"--{k.replace('_', '-')}: {exc}") from None
    over["data"] = str(kw["data"].resolve()) if kw["data"] else None
    for item in kw["params"]:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--param {item!r}: use KEY=VALUE")
        over[key] = coerce(key, value)
    for key in ("dev_data", "layer_map"):   # recorded absolute in summary.json: the run can be repeated
        if over.get(key):                    # from anywhere (and a remote worker gets a full path)
            over[key] = str(Path(over[key]).resolve())
    return resolve(over)


OPTION_PARAMS = ("lr", "warmup", "total_steps", "iters", "epochs", "batch_size", "dropout")  # --lr X = --param lr=X


def _given_params(kw) -> set[str]:
    """Hyper-parameters the user set (options or --param), as opposed to defaults."""
    given = {k for k in (*OPTION_PARAMS, "data") if kw.get(k) is not None}
    return given | {item.partition("=")[0] for item in kw["params"]}


def _check_devices(td: str, pd: str, allow_shared: bool) -> None:
    """Valid device strings; one GPU for both only with --allow-shared-gpu (UUIDs are checked after HELLO)."""
    from .placement import check_device_flags
    check_device_flags(td, pd, allow_shared)


def _options_json(opts) -> dict:
    d = {k: v for k, v in vars(opts).items() if k not in ("worker_argv", "worker_env")}
    d["out"] = str(opts.out)
    d["params_given"] = sorted(opts.params_given)
    d["tolerances"] = {k: v.describe() for k, v in opts.tolerances.items()}
    return d


def _print_table(console, data: dict) -> None:
    from rich.table import Table
    from rich.text import Text    # cells as plain text: a '[...]' or ':name:' in a message is not markup
    t = Table(title="lockstep verdict")
    for col in ("step", "verdict", "worst diff", "tolerance", "seconds", "note"):
        t.add_column(col)
    from .report_html import worst_label
    for s in data.get("steps", []):
        t.add_row(Text(s["name"]), s["status"].upper(), worst_label(s),
                  Text(s.get("tolerance", "")), f"{s.get('seconds', 0):.1f}", Text(_clip(s.get("message") or "", 160)))
    for name, why in (data.get("steps_skipped") or {}).items():
        t.add_row(Text(name), "SKIPPED", "-", Text(""), "", Text(_clip(why, 160)))
    console.print(t)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _add_commands() -> None:
    import importlib
    import pkgutil
    from . import commands
    for m in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        cmd = getattr(importlib.import_module(f"{commands.__name__}.{m.name}"), "command", None)
        if cmd is not None:
            main.add_command(cmd)


_add_commands()

if __name__ == "__main__":
    main()
