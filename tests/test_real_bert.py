"""End to end with both real environments on the real MiniLM weights (issue 2)."""

import json

import numpy as np
import pytest

from conftest import ROOT
from coordinator.errors import ExitCode
from coordinator.safe_npy import load_reprod_npy
from real_envs import real_run, run_in_env

pytestmark = pytest.mark.frameworks


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    out = tmp_path_factory.mktemp("aligned")
    proc = real_run(["--steps", "weights,forward"], out)
    return proc, out


@pytest.fixture(scope="module")
def untransposed(tmp_path_factory):
    out = tmp_path_factory.mktemp("untransposed")
    proc = real_run(["--steps", "weights,forward", "--mapping",
                     str(ROOT / "tests/data/bert_query0_untransposed.toml")], out)
    return proc, out


def test_minilm_converts_and_forward_aligns(aligned):
    proc, out = aligned
    assert proc.returncode == ExitCode.ALIGNED, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    weights, forward = s["steps"]
    assert weights["details"]["paddle_keys"] == 105 and weights["details"]["transposed"] == 38
    assert weights["worst"] == 0.0  # the read-back is bit-exact
    diffs = {d["name"]: d for d in forward["diffs"]}
    assert set(diffs) == {"logits", "pooled", "last_hidden"}
    assert diffs["last_hidden"]["max_abs"] < 1e-5 and diffs["last_hidden"]["mean_abs"] < 1e-6
    assert diffs["logits"]["shape"] == [4, 2]
    assert s["workers"]["torch"]["framework"] == "torch" and s["workers"]["paddle"]["framework"] == "paddle"
    assert "torch-cpu-" in s["workers"]["torch"]["executable"] and "paddle-cpu-" in s["workers"]["paddle"]["executable"]


def test_converted_pdparams_loads_in_paddle(aligned):
    proc, out = aligned
    code = ("import json, paddle, numpy as np\n"
            f"sd = paddle.load({str(out / 'model_state.pdparams')!r})\n"
            "w = np.asarray(sd['bert.encoder.layers.0.self_attn.q_proj.weight'])\n"
            "print(json.dumps([len(sd), float(w.astype(np.float64).sum())]))")
    r = run_in_env("paddle", code)
    assert r.returncode == 0, r.stderr[-2000:]
    n, total = json.loads(r.stdout.strip().splitlines()[-1])
    ours = load_reprod_npy(out / "weights_paddle.npy")["bert.encoder.layers.0.self_attn.q_proj.weight"]
    assert n == 105 and total == float(ours.astype(np.float64).sum())


def test_untransposed_linear_is_caught_and_named(untransposed):
    proc, out = untransposed
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout[-3000:]
    s = json.loads((out / "summary.json").read_text())
    forward = s["steps"][1]
    assert not forward["passed"]
    bad = {d["name"] for d in forward["diffs"] if not d["passed"]}
    assert bad == {"logits", "pooled", "last_hidden"}
    assert "last_hidden" in proc.stdout and "FAIL" in proc.stdout


REPROD = """
import sys, numpy as np
from reprod_log import ReprodDiffHelper
h = ReprodDiffHelper()
a = h.load_info(sys.argv[1]); b = h.load_info(sys.argv[2])
h.compare_info(a, b)
h.report(diff_method="max", diff_threshold=1e-5, path=sys.argv[3])
"""


@pytest.mark.parametrize("which", ["aligned", "untransposed"])
def test_reprod_log_reads_our_files_and_agrees(which, request, tmp_path):
    proc, out = request.getfixturevalue(which)
    script = tmp_path / "check.py"
    script.write_text(REPROD)
    log = tmp_path / "reprod.log"
    code = (f"import sys; sys.argv = ['x', {str(out / 'forward_torch.npy')!r}, {str(out / 'forward_paddle.npy')!r}, "
            f"{str(log)!r}]; exec(open({str(script)!r}).read())")
    r = run_in_env("paddle", code)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = log.read_text().strip().splitlines()
    ours = (out / "forward_diff.log").read_text().strip().splitlines()
    strip = lambda lines: [l.split("] ", 1)[1] for l in lines]  # noqa: E731  (timestamps differ)
    assert strip(theirs)[-1] == strip(ours)[-1]  # same verdict
    # same layout and same per-key verdicts; values agree to float32 printing precision
    assert [l.split(", value:")[0] for l in strip(theirs)] == [l.split(", value:")[0] for l in strip(ours)]
