"""``coordinator compare A.npy B.npy``: check two existing reprod_log files offline.

Does what ``ReprodDiffHelper().compare_info(...); .report(...)`` does, with three differences:
the files are read with ``safe_npy.load_reprod_npy`` (a restricted unpickler: a crafted
``.npy`` is refused, never executed); a NaN/Inf or a shape mismatch is a failure (reprod_log
prints ``check passed: True`` for a NaN, broadcasts shapes and transposes A when that makes the
shapes match); differing key sets are reported by name instead of an assertion error; nested
dicts are refused. The report has reprod_log's format (docs/stages.md).

Exit codes: 0 every key within the threshold, 1 a key differs / is missing on one side,
2 bad input (missing file, not a reprod_log dict, refused pickle, bad option).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..compare import TensorDiff, Tolerance, compare
from ..errors import ExitCode, LockstepError


def compare_files(a_path: Path, b_path: Path, tol: Tolerance) -> tuple[list[TensorDiff], list[str], list[str]]:
    """Per-key diffs of the keys both files hold (in A's order), and the keys only in A / only in B."""
    from ..safe_npy import load_reprod_npy
    a, b = load_reprod_npy(a_path), load_reprod_npy(b_path)
    only_a = [k for k in a if k not in b]
    only_b = [k for k in b if k not in a]
    diffs = [compare(k, a[k], b[k], tol, ref_side="A", got_side="B") for k in a if k in b]
    return diffs, only_a, only_b


@click.command("compare")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(["mean", "max", "min", "rel"]), default="mean", show_default=True,
              help="statistic of |A-B| per key (reprod_log's diff_method), or rel: max|A-B| / max|A|")
@click.option("--threshold", type=float, default=1e-6, show_default=True, help="reprod_log's diff_threshold")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the report here (reprod_log's diff.log format, then the reasons as # lines)")
def command(a: Path, b: Path, method: str, threshold: float, out: Path | None) -> None:
    """Compare two reprod_log .npy files (A = reference) key by key; exit 0 pass, 1 fail, 2 bad input."""
    from ..reprodlog import format_report
    try:
        if not threshold >= 0:
            raise click.BadParameter(f"{threshold} (need a number >= 0)", param_hint="--threshold")
        tol = Tolerance(threshold, method)
        diffs, only_a, only_b = compare_files(a, b, tol)
    except LockstepError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.BadParameter as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(ExitCode.USAGE)
    text = format_report(diffs, method, threshold)
    if only_a or only_b:  # reprod_log would stop on an assertion; say which keys and fail the check
        text = text.replace("diff check passed", "diff check failed")
    failing = [d for d in diffs if not d.passed]
    why = [f"FAIL {d.name}: {d.reason}" for d in failing]
    if only_a:
        why.append(f"FAIL keys only in {a.name} ({len(only_a)}): {', '.join(only_a)}")
    if only_b:
        why.append(f"FAIL keys only in {b.name} ({len(only_b)}): {', '.join(only_b)}")
    ok = not failing and not only_a and not only_b
    why.append(f"{len(diffs) - len(failing)}/{len(diffs)} common keys within {tol.describe()}; "
               f"{'passed' if ok else 'failed'}")
    click.echo(text, nl=False)
    click.echo("\n".join(why))
    if out is not None:   # the report; when it failed, then why (e.g. the key sets) as # comment lines
        try:
            out.write_text(text + ("" if ok else "".join(f"# {line}\n" for line in why)))
        except OSError as exc:
            click.echo(f"error: --out {out}: cannot write the report ({exc.strerror or exc})", err=True)
            sys.exit(ExitCode.USAGE)
    sys.exit(ExitCode.ALIGNED if ok else ExitCode.DIVERGED)
