"""Step ``layers`` and ``coordinator debug`` on the real MiniLM in both environments (issue 4).

Negative controls: a LayerNorm epsilon (ln_eps:3:1e-5, changes last_hidden by only ~1e-5),
a GELU tanh approximation (gelu_tanh:2) and an untransposed square query weight (a mapping
file) must each be reported at the exact layer, as that layer's OWN error, with every
earlier layer passing. A correct conversion reports no divergent layer.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from coordinator.errors import ExitCode
from real_envs import env_python, real_run

pytestmark = pytest.mark.frameworks


def _layers(out):
    s = json.loads((out / "summary.json").read_text())
    return s, next(x for x in s["steps"] if x["name"] == "layers")


def _check_exact_own_error(out, torch_name, paddle_name, advice_word):
    s, step = _layers(out)
    fwd = step["details"]["forward"]
    first = fwd["first"]
    assert (first["torch"], first["paddle"], first["what"]) == (torch_name, paddle_name, "output")
    assert first["isolation"]["verdict"] == "own", first["isolation"]
    assert advice_word in " ".join(first["isolation"]["advice"]["causes"])
    before = [r for r in fwd["rows"] if r["seq"] < first["seq"]]
    assert len(before) > 10 and all(r["passed"] for r in before)   # every earlier layer passes
    assert s["exit_code"] == ExitCode.DIVERGED
    return s, step


@pytest.mark.timeout(180)
def test_correct_conversion_has_no_divergent_layer(tmp_path):
    # a 1 MiB hold budget forces torch's tensors (they arrive before paddle's) through the spill file
    proc = real_run(["--steps", "layers", "--schedule", "alternate", "--param", "layers_hold_mib=1"], tmp_path)
    assert proc.returncode == ExitCode.ALIGNED, proc.stdout[-4000:] + proc.stderr[-2000:]
    s, step = _layers(tmp_path)
    d = step["details"]
    assert d["forward"]["failed"] == 0 and "first" not in d["forward"]
    assert d["backward"]["failed"] == 0 and d["backward"]["compared"] > 150  # grads of outputs and parameters
    assert d["forward"]["compared"] >= 90 and d["map"]["n_pairs"] >= 70
    assert d["forward"]["stats"]["spilled_bytes"] > 0 and not list(tmp_path.glob("layers-hold-*"))
    worst = max(r["norm_err"] for r in d["forward"]["rows"])
    assert 0 < worst < 5e-6
    kinds = {r["torch_type"] for r in d["forward"]["rows"]}
    assert {"Linear", "LayerNorm", "GELUActivation", "Embedding", "BertLayer"} <= kinds
    assert any(r["what"] == "input" and "attention.output.dense" in r["torch"] for r in d["forward"]["rows"])
    assert any(u["name"].endswith("attention.self.dropout") for u in d["map"]["unmapped"])  # listed, not dropped
    assert (tmp_path / "report.html").stat().st_size > 10000 and (tmp_path / "layers.tsv").exists()
    assert "  ok " in proc.stdout and "FAIL" not in proc.stdout


@pytest.mark.timeout(180)
def test_layernorm_epsilon_is_own_error_at_norm1_of_layer_3(tmp_path):
    proc = real_run(["--steps", "layers", "--paddle-inject", "ln_eps:3:1e-5", "--stop-at-first"], tmp_path)
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout[-4000:]
    s, step = _check_exact_own_error(tmp_path, "bert.encoder.layer.3.attention.output.LayerNorm",
                                     "bert.encoder.layers.3.norm1", "epsilon")
    assert step["details"]["stop_run"] and "skipped" in step["details"]["backward"]
    assert "isolated: OWN ERROR" in proc.stdout and "usual cause: epsilon differs" in proc.stdout
    assert "epsilon=1e-05" in proc.stdout and "eps=1e-12" in proc.stdout   # both layers' own settings


@pytest.mark.timeout(180)
def test_gelu_tanh_is_own_error_at_the_activation_of_layer_2(tmp_path):
    # workers in parallel: both streams interleave at the coordinator
    proc = real_run(["--steps", "layers", "--paddle-inject", "gelu_tanh:2", "--schedule", "parallel",
                     "--param", "layers_backward=false"], tmp_path)
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout[-4000:]
    s, step = _check_exact_own_error(tmp_path, "bert.encoder.layer.2.intermediate.intermediate_act_fn",
                                     "bert.encoder.layers.2.activation", "tanh approximation")
    assert step["details"]["backward"] == {"skipped": "layers_backward is off"}
    fwd = step["details"]["forward"]  # paced (layers_pace 8): tensors diffed and dropped as they arrive,
    one_side = sum(4 * int(np.prod(r["shape"])) for r in fwd["rows"] if r.get("shape"))
    assert 0 < fwd["stats"]["held_peak_bytes"] < 0.3 * one_side, (fwd["stats"], one_side)  # turns hold ~all


@pytest.mark.timeout(180)
def test_untransposed_square_query_is_own_error_at_layer_0_query(tmp_path):
    proc = real_run(["--steps", "weights,layers", "--stop-at-first", "--mapping",
                     str(ROOT / "tests/data/bert_query0_untransposed.toml")], tmp_path)
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout[-4000:]
    s, step = _check_exact_own_error(tmp_path, "bert.encoder.layer.0.attention.self.query",
                                     "bert.encoder.layers.0.self_attn.q_proj", "[out, in]")
    assert s["steps"][0]["name"] == "weights" and s["steps"][0]["passed"]   # shapes could not catch it


@pytest.mark.timeout(240)
def test_debug_driven_through_stdin(tmp_path):
    env_python("torch"), env_python("paddle")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSTEP_WORKER_ARGV")}
    script = "stats\ntop 3\nreplay\nprev\nreplay\ngoto bert.encoder.layer.1.output.dense\nreplay\n" \
             "next\ncontinue\nfrobnicate\ntop -1\ntop abc\nlist x\nquit\n"
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "debug", "--out", str(tmp_path), "--no-create",
                           "--paddle-inject", "ln_eps:3:1e-5"], input=script, capture_output=True, text=True,
                          timeout=220, cwd=ROOT, env=env)
    out = proc.stdout
    assert proc.returncode == ExitCode.DIVERGED, out[-4000:] + proc.stderr[-2000:]
    assert "-- stopped at the first divergence" in out
    assert "at row 58/" in out and "bert.encoder.layer.3.attention.output.LayerNorm" in out
    after_stop = out.split("-- stopped at", 1)[1]
    assert "  ok " not in after_stop.split("(lockstep)", 1)[0]           # the live view stopped there
    assert "torch  float32" in out and "paddle float32" in out and "max|diff|/max|torch|" in out    # stats
    assert out.count("|diff|") >= 3                                                                  # top 3
    assert "isolated: OWN ERROR" in out and "epsilon differs" in out                                 # replay
    # prev = the residual sum feeding that LayerNorm: it agrees run alone (to ~1e-7)
    assert "LayerNorm <input> (inside the replayed bert.encoder.layer.3)" in out
    assert "isolated: agrees" in out
    assert "-- next divergence --" in out and "unknown command 'frobnicate'" in out
    assert out.count("usage: top [k]") == 2 and "usage: list [n]" in out and "ValueError" not in out
    assert len(out) < 200_000   # `top -1` once printed every element of the tensor
    s = json.loads((tmp_path / "summary.json").read_text())
    dbg = s["steps"][0]
    assert dbg["name"] == "debug" and dbg["details"]["first"]["torch"].endswith("layer.3.attention.output.LayerNorm")
    replays = [c["replay"]["verdict"] for c in dbg["details"]["session"] if "replay" in c]
    assert replays == ["own", "ok", "ok"]
    assert (tmp_path / "report.html").exists()


@pytest.mark.timeout(300)
def test_debug_continue_own_finds_the_second_bug_behind_the_first(tmp_path):
    """Two bugs: a LayerNorm epsilon in layer 1 and a tanh GELU in layer 3. Plain ``continue`` stops
    at the very next divergent row (inherited from the first bug: the negative control);
    ``continue own`` replays each divergent row on the way, passes over those that agree run alone,
    and stops at layer 3's activation; a second ``continue own`` finds no further own error."""
    env_python("torch"), env_python("paddle")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSTEP_WORKER_ARGV")}
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "debug", "--out", str(tmp_path), "--no-create",
                           "--param", "layers_backward=false", "--paddle-inject", "ln_eps:1:1e-5",
                           "--paddle-inject", "gelu_tanh:3"], input="continue\ncontinue own\ncontinue own\nquit\n",
                          capture_output=True, text=True, timeout=280, cwd=ROOT, env=env)
    out = proc.stdout
    assert proc.returncode == ExitCode.DIVERGED, out[-4000:] + proc.stderr[-2000:]
    first, plain, own1, own2 = out.split("(lockstep) ")[0:4]
    assert "bert.encoder.layer.1.attention.output.LayerNorm" in first.rsplit("at row", 1)[1]
    assert "-- next divergence --" in plain and "bert.encoder.layer.1.intermediate.dense" in plain.split("at row")[1]
    assert "-- next own error --" in own1 and "intermediate_act_fn" in own1.split("at row")[1]
    assert "bert.encoder.layer.3.intermediate" in own1.split("at row")[1] and "OWN ERROR" in own1
    assert own1.count(": inherited (run alone it agrees") >= 10
    assert "no further own error" in own2 and "OWN ERROR" not in own2
    # a block holding the first bug is not replayed (it would run that bug again) ...
    assert "bert.encoder: inherited (replaying bert.encoder would run bert.encoder.layer.1.attention.output" in own2
    # ... one holding only rows shown to agree run alone is
    assert "bert.encoder.layer.4: inherited (run alone it agrees" in own2
    s = json.loads((tmp_path / "summary.json").read_text())
    walks = [c for c in s["steps"][0]["details"]["session"] if c["command"] == "continue own"]
    assert [w["replays"][-1]["verdict"] for w in walks] == ["own", "inherited"]
    assert walks[0]["row"].endswith("layer.3.intermediate.intermediate_act_fn")


@pytest.mark.timeout(300)
def test_layers_isolate_all_reports_the_second_bug_in_both_phases(tmp_path):
    """--param layers_isolate=all: every divergent row after the first is replayed (with the live
    comparison's floor, so the key bias gradient's ~1e-10 of noise is no 'own error'); the
    report names the tanh GELU of layer 3 as the one other own error, forward and backward, and
    every other divergent row as inherited. The control: the default replays the first only."""
    proc = real_run(["--steps", "layers", "--param", "layers_isolate=all", "--paddle-inject", "ln_eps:1:1e-5",
                     "--paddle-inject", "gelu_tanh:3"], tmp_path / "all")
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout[-4000:] + proc.stderr[-2000:]
    _, step = _layers(tmp_path / "all")
    fwd, bwd = step["details"]["forward"], step["details"]["backward"]
    assert fwd["first"]["torch"] == "bert.encoder.layer.1.attention.output.LayerNorm"
    act = "bert.encoder.layer.3.intermediate.intermediate_act_fn"
    assert [e["label"] for e in fwd["own_errors"]] == [act], [e["label"] for e in fwd["own_errors"]]
    assert [e["label"] for e in bwd["own_errors"]] == [act], [e["label"] for e in bwd["own_errors"]]
    assert f"1 more own error(s) after it: {act}" in step["message"]
    assert "forward: after the first, " in proc.stdout and " inherited, 1 own error(s)" in proc.stdout
    html = (tmp_path / "all" / "report.html").read_text()
    assert html.count("own errors after the first</b>") == 2 and f"<code>{act}</code>" in html
    proc = real_run(["--steps", "layers", "--param", "layers_backward=false", "--paddle-inject", "ln_eps:1:1e-5",
                     "--paddle-inject", "gelu_tanh:3"], tmp_path / "first")
    assert proc.returncode == ExitCode.DIVERGED
    assert "own_errors" not in _layers(tmp_path / "first")[1]["details"]["forward"]


@pytest.mark.timeout(240)
def test_debug_ctrl_c_at_the_prompt_ends_as_interrupted_and_keeps_the_session(tmp_path):
    """Exit 130 with the session in summary.json and the report written (it used to go on at the prompt,
    then exit 1); an unknown --at is a usage error, not a silent fallback to row 1."""
    import signal
    import time
    env_python("torch"), env_python("paddle")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSTEP_WORKER_ARGV")}
    argv = [sys.executable, "-m", "coordinator.cli", "debug", "--no-create", "--param", "layers_backward=false"]
    bad = subprocess.run(argv + ["--out", str(tmp_path / "at"), "--at", "no.such.layer"], capture_output=True,
                         text=True, timeout=220, cwd=ROOT, env=env)
    assert bad.returncode == ExitCode.USAGE, bad.stderr
    assert "--at 'no.such.layer': no layer or parameter has that name" in " ".join(bad.stderr.split()), bad.stderr
    out = tmp_path / "int"
    proc = subprocess.Popen(argv + ["--out", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    try:
        proc.stdin.write("where\n")
        proc.stdin.flush()
        seen = ""
        while "(lockstep) where" not in seen:       # the first command was read: the prompt is waiting again
            line = proc.stdout.readline()
            assert line, seen[-3000:]
            seen += line
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:   # a failure above must not leave the coordinator (and its two workers) at the prompt
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == ExitCode.INTERRUPTED, (seen + rest)[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["steps"][0]["name"] == "debug"
    assert [c["command"] for c in s["steps"][0]["details"]["session"]] == ["where"]
    assert (out / "report.html").exists()


@pytest.mark.timeout(240)
def test_report_renders_in_headless_chromium(tmp_path):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    run = tmp_path / "run"
    proc = real_run(["--steps", "layers", "--paddle-inject", "gelu_tanh:2", "--param", "layers_backward=false"], run)
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout[-3000:]
    png = tmp_path / "report.png"
    r = subprocess.run([str(ROOT / "scripts/screenshot_report.sh"), str(run), str(png), "1280x1400"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30000   # a page with content, not a blank one
    assert "first divergence: bert.encoder.layer.2.intermediate.intermediate_act_fn" in \
        (run / "report.html").read_text()
