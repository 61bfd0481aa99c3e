"""The coordinator against numpy fake workers started as real subprocesses (no framework needed)."""

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, coordinator, fake_env, load_summary
from coordinator.errors import ExitCode


def test_aligned_run_writes_every_artifact(fake_run):
    proc, out = fake_run("--steps", "weights,forward")
    assert proc.returncode == ExitCode.ALIGNED, proc.stdout + proc.stderr
    for f in ("weights_torch.npy", "weights_paddle.npy", "weights_diff.log", "forward_torch.npy",
              "forward_paddle.npy", "forward_diff.log", "summary.json", "events.jsonl"):
        assert (out / f).exists(), f
    s = load_summary(out)
    assert s["status"] == "aligned" and [x["name"] for x in s["steps"]] == ["weights", "forward"]
    assert all(x["passed"] for x in s["steps"])
    assert (out / "forward_diff.log").read_text().strip().endswith("diff check passed")
    assert s["workers"]["torch"]["protocol"] == 1
    assert not (out / ".sock").exists()   # the private socket and its directory are gone after the run
    assert not (out / ".lock").exists()


def test_weights_npy_false_skips_only_the_two_large_files(fake_run):
    """--param weights_npy=false: no weights_*.npy (twice the model's size), the same verdict and log;
    the control is the test above (the files are written by default). A corrupted read-back still fails."""
    proc, out = fake_run("--steps", "weights,forward", "--param", "weights_npy=false")
    assert proc.returncode == ExitCode.ALIGNED, proc.stdout + proc.stderr
    assert not (out / "weights_torch.npy").exists() and not (out / "weights_paddle.npy").exists()
    assert (out / "weights_diff.log").read_text().strip().endswith("diff check passed")
    assert (out / "forward_torch.npy").exists()
    assert load_summary(out)["steps"][0]["details"]["npy"].startswith("not written")
    proc, _ = fake_run("--steps", "weights", "--param", "weights_npy=false", paddle="badset@set_weights")
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout + proc.stderr


def test_a_long_run_path_socket_in_a_temp_directory_is_removed_too(tmp_path, monkeypatch):
    """ipc paths are limited to ~107 bytes: a deep run directory gets its socket in a temp dir,
    which close() removes (the control: it existed while the session was open)."""
    from coordinator.session import Session
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    session = Session(deep)
    sock = Path(session.endpoint[len("ipc://"):])
    assert sock.parent.parent == tmp_path and sock.exists()
    session.close()
    assert not sock.parent.exists() and not (deep / ".sock").exists()


def test_forward_divergence_is_flagged_and_named(fake_run):
    proc, out = fake_run("--steps", "weights,forward", paddle="bug@forward")
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout + proc.stderr
    s = load_summary(out)
    fwd = [x for x in s["steps"] if x["name"] == "forward"][0]
    assert not fwd["passed"] and "logits" in fwd["message"]
    assert fwd["diffs"][0]["max_abs"] > 1e-3
    assert (out / "forward_diff.log").read_text().strip().endswith("diff check failed")


def test_a_relative_tolerance_flags_the_broken_port_and_passes_the_faithful_one(fake_run, tmp_path):
    """--tolerance forward=rel:T: the verdict is on max|diff| / max|torch|, written as such in
    summary.json and forward_diff.log; the same command on the faithful fake passes."""
    proc, out = fake_run("--steps", "weights,forward", "--tolerance", "forward=rel:1e-4", paddle="bug@forward")
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout + proc.stderr
    d = [x for x in load_summary(out)["steps"] if x["name"] == "forward"][0]["diffs"][0]
    assert d["method"] == "rel" and d["value"] == pytest.approx(d["max_abs"] / d["ref_scale"])
    assert d["value"] > 1e-4 and d["tolerance"] == "max|diff|/max|ref| <= 0.0001"
    log = (out / "forward_diff.log").read_text()
    assert f"rel diff: check passed: False, value: {d['value']}" in log
    ok = coordinator(["run", "--out", str(tmp_path / "ok"), "--mapping", str(ROOT / "tests/data/fake_mlp.toml"),
                      "--steps", "weights,forward", "--tolerance", "forward=rel:1e-4"], env=fake_env())
    assert ok.returncode == ExitCode.ALIGNED, ok.stdout + ok.stderr
    assert "rel diff: check passed: True" in (tmp_path / "ok/forward_diff.log").read_text()


def test_fail_fast_says_which_steps_it_did_not_run(fake_run):
    proc, out = fake_run("--steps", "weights,forward,weights", "--fail-fast", paddle="bug@forward")
    assert proc.returncode == ExitCode.DIVERGED, proc.stdout + proc.stderr
    s = load_summary(out)
    assert [x["name"] for x in s["steps"]] == ["weights", "forward"]
    assert s["steps_not_run"] == {"steps": ["weights"], "why": "--fail-fast: step 'forward' failed"}
    assert "not run (--fail-fast, step forward failed): weights" in proc.stdout
    ctl = out.parent / "control"   # without --fail-fast every step runs
    proc = coordinator(["run", "--out", str(ctl), "--mapping", str(ROOT / "tests/data/fake_mlp.toml"),
                        "--steps", "weights,forward,weights"], env=fake_env(paddle="bug@forward"))
    assert [x["name"] for x in load_summary(ctl)["steps"]] == ["weights", "forward", "weights"]
    assert "steps_not_run" not in load_summary(ctl)


def test_nan_never_passes(fake_run):
    proc, out = fake_run("--steps", "weights,forward", paddle="nan@forward")
    assert proc.returncode == ExitCode.DIVERGED
    fwd = load_summary(out)["steps"][1]
    assert "nan in paddle output at index [1, 1]" in fwd["message"]
    assert "check passed: False" in (out / "forward_diff.log").read_text()


def test_broken_mapping_names_key_and_both_shapes(tmp_path):
    out = tmp_path / "r"
    proc = coordinator(["run", "--steps", "weights", "--out", str(out), "--mapping",
                        str(ROOT / "tests/data/fake_mlp_notranspose.toml")], env=fake_env())
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "fc1.weight" in text and "(8, 4)" in text and "(4, 8)" in text
    assert load_summary(out)["status"] == "error"


def test_worker_exiting_before_hello_shows_exit_code_and_log(fake_run):
    proc, out = fake_run("--steps", "weights", torch="exit-before-hello")
    assert proc.returncode == ExitCode.ENVIRONMENT
    assert "torch worker exited with code 3" in proc.stdout
    assert "exiting before hello as asked" in proc.stdout


def test_worker_killed_mid_op_is_detected_quickly(fake_run):
    t0 = time.monotonic()
    proc, out = fake_run("--steps", "weights,forward", paddle="kill@forward")
    took = time.monotonic() - t0
    assert proc.returncode == ExitCode.WORKER_DIED, proc.stdout
    assert "paddle worker killed by signal SIGKILL during forward" in proc.stdout
    assert took < 20
    s = load_summary(out)
    assert s["steps"][0]["name"] == "weights" and s["steps"][0]["passed"]  # completed steps are kept


def test_hung_worker_is_stopped_with_its_stack(fake_run):
    proc, out = fake_run("--steps", "forward", "--timeout", "2", torch="hang@forward")
    assert proc.returncode == ExitCode.WORKER_HUNG, proc.stdout
    assert "did not answer op 'forward'" in proc.stdout
    assert "fake_worker.py" in proc.stdout and "in fault" in proc.stdout  # faulthandler's stack dump


def test_protocol_version_mismatch_refused_before_weights_move(fake_run):
    proc, out = fake_run("--steps", "weights", paddle="wrong-version")
    assert proc.returncode == ExitCode.PROTOCOL, proc.stdout
    assert "protocol version 999" in proc.stdout
    assert not (out / "weights_torch.npy").exists()


def test_unknown_step_is_a_usage_error(fake_run):
    proc, out = fake_run("--steps", "weights,bogus")
    assert proc.returncode == ExitCode.USAGE
    assert "bogus" in proc.stdout
    assert not out.exists()   # refused before the run directory is made


@pytest.mark.parametrize("step", ["data", "train", "perf"])
def test_a_bert_only_step_asked_for_by_name_is_refused_for_a_factory_model(tmp_path, step):
    """Before any worker starts or anything is written; the step, the reason and the factory are named."""
    proc = coordinator(["run", "--steps", f"weights,{step}", "--out", str(tmp_path / "r"),
                        "--torch-model", "mine.t:build", "--paddle-model", "mine.p:build"], env=fake_env())
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    msg = " ".join(proc.stdout.split())
    assert f"step '{step}' cannot run on this model" in msg and "factory 'mine.t:build'" in msg
    assert not (tmp_path / "r").exists()
    from coordinator.cli import _unsupported
    assert _unsupported([step], False, {"torch_model": "bert", "paddle_model": "bert"}) == {}   # presets: no refusal
    assert step in _unsupported([step], True, {"torch_model": "mine.t:build", "paddle_model": "mine.p:build"})


def test_the_lockstep_wrapper_runs_in_the_callers_directory(tmp_path):
    """`./lockstep run` from elsewhere: relative paths are the caller's (here a bad --data file,
    refused before any worker starts, by its path in the caller's directory)."""
    if not (ROOT / ".venv" / "bin" / "coordinator").exists():
        pytest.skip("needs the project's .venv (made by ./lockstep on first use)")
    (tmp_path / "mine.tsv").write_text("label\tsentence\nnot-a-label\thello\n")
    proc = subprocess.run([str(ROOT / "lockstep"), "run", "--steps", "data", "--data", "mine.tsv",
                           "--out", "here"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=fake_env())
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    assert f"{tmp_path / 'mine.tsv'}:2: label 'not-a-label' is not an integer" in proc.stdout.replace("\n", "")
    assert not (tmp_path / "here").exists() and not (ROOT / "here").exists()



def test_reprod_npy_files_hold_plain_dicts_of_arrays(fake_run):
    from coordinator.safe_npy import load_reprod_npy
    proc, out = fake_run("--steps", "weights,forward")
    assert proc.returncode == 0
    d = load_reprod_npy(out / "forward_torch.npy")
    assert set(d) == {"logits"} and d["logits"].shape == (4, 2) and d["logits"].dtype == np.float32


def test_reprod_npy_files_open_on_numpy_1_as_well(fake_run, tmp_path):
    """numpy < 1.26 has no ``numpy._core``: an unpickler that, like it, cannot import that module
    opens our files (and finds the same arrays), and refuses what numpy 2's own np.save writes
    (the control: the check can fail)."""
    import io
    import pickle
    import warnings

    class Numpy1Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("numpy._core"):
                raise ModuleNotFoundError(f"No module named {module!r} (numpy 1.25)")
            return super().find_class(module, name)

    def load(path):
        raw = path.read_bytes()
        return Numpy1Unpickler(io.BytesIO(raw[raw.index(b"\n") + 1:])).load().item()

    proc, out = fake_run("--steps", "weights,forward")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for f in ("weights_torch.npy", "weights_paddle.npy", "forward_torch.npy", "forward_paddle.npy"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # no DeprecationWarning on numpy 2 either
            ours, current = load(out / f), np.load(out / f, allow_pickle=True).item()
        assert set(ours) == set(current) and all(np.array_equal(ours[k], current[k]) for k in ours)
    np.save(tmp_path / "np2.npy", {"logits": np.zeros(2, np.float32)})
    with pytest.raises(ModuleNotFoundError, match="numpy._core"):
        load(tmp_path / "np2.npy")


def test_summary_tells_worker_compute_from_coordinator_time(fake_run):
    """Each step records the seconds each worker's handlers reported: a worker made slow in
    forward shows it there and only there (control: the other worker and the other step)."""
    proc, out = fake_run("--steps", "weights,forward", paddle="slow=1.5@forward")
    assert proc.returncode == ExitCode.ALIGNED, proc.stdout + proc.stderr
    steps = {x["name"]: x for x in load_summary(out)["steps"]}
    fwd, w = steps["forward"], steps["weights"]
    assert set(fwd["worker_seconds"]) == {"torch", "paddle"}
    assert 1.5 <= fwd["worker_seconds"]["paddle"] <= fwd["seconds"]
    assert fwd["worker_seconds"]["torch"] < 0.5 and w["worker_seconds"]["paddle"] < 0.5


def test_a_step_that_raises_is_an_internal_error_not_a_divergence(tmp_path, monkeypatch):
    """Exit 8, the message printed, the traceback kept, and the steps after it still run; the
    control run without the faulty step is aligned."""
    from coordinator.cli import _worker_specs
    from coordinator.params import resolve
    from coordinator.runner import RunOptions, run

    for k, v in fake_env().items():
        monkeypatch.setenv(k, v)

    def boom(rc):
        raise ZeroDivisionError("a step's own bug")

    def go(steps: list[str], out):
        said: list[str] = []
        opts = RunOptions(steps=steps, out=out, mapping=str(ROOT / "tests/data/fake_mlp.toml"), params=resolve({}))
        code, summary = run(opts, _worker_specs(opts, True, said.append), said.append, extra_steps={"boom": boom})
        return code, summary.data, said

    code, data, said = go(["boom", "weights"], tmp_path / "a")
    assert code == ExitCode.INTERNAL == 8 and data["status"] == "error"
    boom_step, weights = data["steps"]
    assert boom_step["status"] == "error" and "ZeroDivisionError: a step's own bug" in boom_step["details"]["traceback"]
    assert weights["status"] == "passed"
    assert any("step boom: internal error ZeroDivisionError: a step's own bug" in s for s in said)
    code, data, _ = go(["weights"], tmp_path / "b")
    assert code == ExitCode.ALIGNED and data["status"] == "aligned"


@pytest.mark.parametrize("args, message", [
    (["--steps", ""], "--steps '': no step given"),
    (["--steps", "forward", "--tolerance", "foward=max:1e-5"], "no step or sub-check 'foward'"),
    (["--steps", "forward", "--tolerance", "forward=ulp:4"], "method max, mean or min"),
    (["--steps", "forward", "--tolerance", "weights=max:1e-3"], "no step or sub-check 'weights'"),   # exact by design
    (["--steps", "forward", "--tolerance", "layers.backward=mean:1e-4"], "use layers.backward=rel:T"),
    (["--steps", "forward", "--out", "{file}"], "exists and is not a directory"),
    (["--steps", "forward", "--out", "{file}/sub"], "cannot create the run directory (Not a directory)"),
    (["--steps", "forward", "--out", "{file}:x"], "a run directory's path cannot hold ':'"),
    (["--steps", "forward", "--torch-model", "minilmx"], "--torch-model 'minilmx': not a preset (minilm, bert)"),
    (["--steps", "forward", "--paddle-model", "pkg.mod:"], "a factory is module.path:function"),
    (["--steps", "forward", "--torch-model", "bert", "--paddle-model", "bert"], "needs --model-path DIR"),
    (["--steps", "forward", "--mapping", "{typo}"], "unknown table or key 'renames'; did you mean 'rename'?"),
    (["--steps", "forward", "--param", "layers_backward=ture"], "layers_backward='ture': expected true or false"),
    (["--steps", "forward", "--param", "layers_hold_mib=-5"], "layers_hold_mib='-5': expected a finite number >= 0"),
    # sizes that would make a step compare nothing (and pass), through --param or the dedicated flags
    (["--steps", "forward", "--iters", "0"], "--iters: parameter iters=0: must be at least 1"),
    (["--steps", "forward", "--iters", "-1"], "--iters: parameter iters=-1: expected a finite number >= 0"),
    (["--steps", "forward", "--epochs", "0"], "--epochs: parameter epochs=0: must be at least 1"),
    (["--steps", "forward", "--batch-size", "-1"], "--batch-size: parameter batch_size=-1"),
    (["--steps", "forward", "--lr", "nan"], "--lr: parameter lr=nan: expected a finite number >= 0"),
    (["--steps", "forward", "--param", "lr=0"], "parameter lr=0.0: must be > 0"),
    (["--steps", "forward", "--param", "perf_steps=0"], "parameter perf_steps=0: must be at least 1"),
    (["--steps", "forward", "--param", "iters=1.5"], "iters='1.5': expected an integer"),
    (["--steps", "forward", "--param", "backward_tensors=foo"], "ends, all, or iteration numbers like 0,3,9"),
    (["--steps", "forward", "--param", "dropout=bogus"], "expected one of off, shared, native"),
    (["--steps", "forward", "--param", "schedules=linear,cosin"], "a comma list of linear, cosine, polynomial"),
    (["--steps", "forward", "--param", "layer_map={file}.missing"], "afile.missing: no such file"),
    (["--steps", "forward", "--param", "dev_data={file}"], "afile:1: header has no"),
    (["--steps", "data", "--data", "{tiny}", "--batch-size", "4"], "tiny.tsv: 2 example(s), too few for 1 batch(es) of 4"),
    (["--steps", "forward", "--forward-threshold", "1e-9", "--tolerance", "forward=max:1"],
     "--forward-threshold/--diff-method and --tolerance forward=... both set the forward tolerance"),
])
def test_bad_command_lines_are_refused_before_anything_starts(tmp_path, args, message):
    """Exit 2 naming the problem, no worker started, no traceback (control: the next test)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "tiny.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    typo = tmp_path / "typo.toml"
    typo.write_text((ROOT / "tests/data/fake_mlp.toml").read_text() + "\n[[renames]]\npattern = 'a'\nreplace = 'b'\n")
    args = [a.replace("{file}", str(afile)).replace("{typo}", str(typo)).replace("{tiny}", str(tmp_path / "tiny.tsv"))
            for a in args]
    proc = coordinator(["run", *args], env=fake_env())
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    assert message in " ".join(proc.stdout.split()) and "Traceback" not in proc.stdout + proc.stderr
    assert "waiting for workers" not in proc.stdout


def test_a_good_tolerance_key_passes_its_check(tmp_path):
    """The control of the cases above: the --tolerance check lets a good key through, and the run
    fails later, on the unknown --param."""
    control = coordinator(["run", "--steps", "forward", "--tolerance", "backward.param=max:1e-4",
                           "--param", "nosuchparam=1", "--out", str(tmp_path / "ctl")], env=fake_env())
    assert control.returncode == ExitCode.USAGE and "nosuchparam" in control.stdout
    assert "no step or sub-check" not in control.stdout


def test_a_default_run_directory_under_a_colon_path_is_a_usage_error(tmp_path):
    """Without --out the run goes to ./runs/<time>: from a directory named 'co:lon' the workers
    could not import lockstep (':' splits PYTHONPATH), so it is exit 2 naming the path, not exit 3
    with advice to rebuild an environment; the control, --out elsewhere, runs."""
    here = tmp_path / "co:lon"
    here.mkdir()
    proc = coordinator(["run", "--steps", "weights", "--mapping", str(ROOT / "tests/data/fake_mlp.toml")],
                       env=fake_env(), cwd=here)
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    text = " ".join(proc.stdout.split())
    assert f"the default run directory {here / 'runs'}: a run directory's path cannot hold ':'" in text
    assert "waiting for workers" not in proc.stdout and not (here / "runs").exists()
    ok = coordinator(["run", "--steps", "weights", "--mapping", str(ROOT / "tests/data/fake_mlp.toml"),
                      "--out", str(tmp_path / "elsewhere")], env=fake_env(), cwd=here)
    assert ok.returncode == ExitCode.ALIGNED, ok.stdout + ok.stderr


def test_messages_in_the_verdict_table_are_printed_as_written(capsys):
    """rich would turn ':smile:' into an emoji and '[bold]' into a style: a user's sentence or a
    file's line must come out as it is."""
    from coordinator.cli import _console, _print_table
    note = "sentence 'Great :smile: movie [bold]x[/bold]' differs; root:x:0:0"
    _print_table(_console(), {"steps": [{"name": "data", "status": "failed", "worst": 1.0, "tolerance": "max <= 0",
                                         "seconds": 1.0, "message": note}]})
    assert note in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--mapping", "{missing}"], "no such file"),
    (["--layer-map", "{missing}"], "no such file"),
])
def test_debug_refuses_missing_files_before_starting_workers(tmp_path, args, message):
    """`coordinator debug` checks its mapping and layer-map files as `run` does: exit 2 naming the
    file, no worker started, no run directory made."""
    args = [a.replace("{missing}", str(tmp_path / "nope.toml")) for a in args]
    proc = coordinator(["debug", "--out", str(tmp_path / "d"), *args], env=fake_env())
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    assert message in proc.stdout + proc.stderr and str(tmp_path / "nope.toml") in proc.stdout + proc.stderr
    assert "waiting for workers" not in proc.stdout and not (tmp_path / "d").exists()


def test_map_check_refuses_a_missing_file_before_starting_workers(tmp_path):
    proc = coordinator(["map", "--check", str(tmp_path / "nope.toml"), "--torch-model", "examples.cnn.torch_model:build",
                        "--paddle-model", "examples.cnn.paddle_model:build"], env=fake_env())
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    said = proc.stdout + proc.stderr
    assert "nope.toml" in said and "starting workers" not in said and "worker logs kept" not in said
