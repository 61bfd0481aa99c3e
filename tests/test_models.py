"""Any model pair (issue 5), in the real environments: the generic ``bert`` preset on a checkpoint
this test writes, user factories with automatic mapping (examples/cnn), a deliberately buggy port,
a wrong mapping file, and factory errors that reach the user with the worker's traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from coordinator.errors import ExitCode
from real_envs import env_python, run_in_env

pytestmark = pytest.mark.frameworks

ROOT = Path(__file__).resolve().parent.parent
CNN = ["--torch-model", "examples.cnn.torch_model:build", "--paddle-model", "examples.cnn.paddle_model:build"]


def cli(args: list[str], cwd: Path = ROOT, timeout: float = 180, input: str | None = None,
        **env_extra: str) -> subprocess.CompletedProcess:
    """The real CLI against the real environments (workers are real processes, cleaned up by the CLI);
    ``input`` goes to its stdin (the debugger's prompt)."""
    env_python("torch"), env_python("paddle")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSTEP_WORKER_ARGV")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(cwd), env=env, input=input)


def run(out: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return cli(["run", "--steps", "weights,forward", "--out", str(out), "--no-create", *args], cwd=cwd)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def text(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


# -- the generic bert preset on a checkpoint directory the test writes ------------------------
WRITE_CKPT = """
import os, sys, torch
from transformers import BertConfig, BertForSequenceClassification
d = sys.argv[1]
words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
open(os.path.join(d, "vocab.txt"), "w").write("\\n".join(words) + "\\n")
torch.manual_seed(0)
cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64, num_labels=2, initializer_range=0.2)
BertForSequenceClassification(cfg).save_pretrained(d)
print(sorted(os.listdir(d)))
"""


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_bert")
    r = run_in_env("torch", f"import sys; sys.argv = ['x', {str(d)!r}]\n" + WRITE_CKPT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (d / "config.json").exists() and (d / "vocab.txt").exists()
    return d


@pytest.mark.timeout(120)
def test_bert_preset_on_a_checkpoint_directory(tiny_bert, tmp_path):
    proc = run(tmp_path / "r", "--torch-model", "bert", "--paddle-model", "bert", "--model-path", str(tiny_bert))
    assert proc.returncode == ExitCode.ALIGNED, text(proc)[-3000:]
    weights, forward = summary(tmp_path / "r")["steps"]
    assert weights["details"]["paddle_keys"] == 41 and weights["details"]["transposed"] == 14
    diffs = {d["name"]: d for d in forward["diffs"]}
    assert diffs["last_hidden"]["shape"] == [4, 64, 32] and diffs["last_hidden"]["max_abs"] < 1e-5


@pytest.mark.timeout(120)
def test_bert_preset_negative_control_untransposed_query(tiny_bert, tmp_path):
    proc = run(tmp_path / "r", "--torch-model", "bert", "--paddle-model", "bert", "--model-path", str(tiny_bert),
               "--mapping", str(ROOT / "tests/data/bert_query0_untransposed.toml"))
    assert proc.returncode == ExitCode.DIVERGED, text(proc)[-3000:]
    forward = summary(tmp_path / "r")["steps"][1]
    assert {d["name"] for d in forward["diffs"] if not d["passed"]} == {"logits", "pooled", "last_hidden"}


@pytest.mark.timeout(180)
def test_builder_injects_are_checked_before_they_are_applied(tiny_bert, tmp_path):
    """A malformed ``ln_eps``/``gelu_tanh`` or a layer the model lacks is the command line's fault
    (exit 2 naming the form), not a worker error (exit 7); a well-formed one still breaks the port."""
    bert = ["--torch-model", "bert", "--paddle-model", "bert", "--model-path", str(tiny_bert)]
    for item, says in (("ln_eps:x:1e-5", "is malformed (form: ln_eps:L:EPS"), ("gelu_tanh", "is malformed (form: gelu_tanh:L"),
                       ("ln_eps:5:1e-5", "the model has encoder layers 0..1"), ("ln_eps:0:-1", "must be in (0, 1e-3]"),
                       ("ln_eps:0:0.1", "paddle's LayerNorm limit"), ("grad_scale", "needs a positive number"),
                       ("adamw_eps:abc", "needs a positive number (e.g. adamw_eps:1e-8)")):
        proc = run(tmp_path / item.replace(":", "_"), *bert, "--paddle-inject", item)
        assert proc.returncode == ExitCode.USAGE, (item, text(proc)[-3000:])
        assert says in " ".join(text(proc).split()), (item, text(proc)[-3000:])
    proc = run(tmp_path / "torch_side", *bert, "--torch-inject", "grad_scale:")
    assert proc.returncode == ExitCode.USAGE and "'grad_scale:' needs a positive number" in text(proc), text(proc)[-3000:]
    proc = run(tmp_path / "ok", *bert, "--paddle-inject", "ln_eps:1:1e-3")
    assert proc.returncode == ExitCode.DIVERGED, text(proc)[-3000:]


# -- factories, automatic mapping, and the buggy port -------------------------------------------
@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn") / "r"
    return run(out, *CNN), out


@pytest.mark.timeout(120)
def test_cnn_example_aligns_with_automatic_mapping(cnn_run):
    proc, out = cnn_run
    assert proc.returncode == ExitCode.ALIGNED, text(proc)[-3000:]
    weights, forward = summary(out)["steps"]
    assert weights["details"]["paddle_keys"] == 16 and weights["details"]["transposed"] == 2
    assert weights["details"]["keys"]["bn1._variance"]["torch"] == "features.1.running_var"
    assert weights["details"]["keys"]["fc1.weight"] == {"torch": "classifier.0.weight", "ops": ["transpose(1, 0)"]}
    (diff,) = forward["diffs"]
    assert diff["name"] == "output" and diff["shape"] == [4, 10] and diff["max_abs"] < 1e-5
    mapping = tomllib.loads((out / "automap.toml").read_text())
    assert mapping["keys"]["features.5.running_mean"] == "bn2._mean"
    assert not (out / ".site").exists() and not (out / ".lock").exists()   # the run's own plumbing is gone
    assert mapping["ignore"]["torch"] == ["features\\.1\\.num_batches_tracked$", "features\\.5\\.num_batches_tracked$"]


@pytest.mark.timeout(120)
def test_buggy_cnn_port_is_flagged_and_named(tmp_path):
    """Negative control: BatchNorm epsilon 1e-3 vs 1e-5. Run from elsewhere, factories found via --*-path."""
    out = tmp_path / "r"
    proc = run(out, "--torch-model", "examples.cnn.torch_model:build", "--torch-path", str(ROOT),
               "--paddle-model", "examples.cnn_buggy.paddle_model:build", "--paddle-path", str(ROOT), cwd=tmp_path)
    assert proc.returncode == ExitCode.DIVERGED, text(proc)[-3000:]
    weights, forward = summary(out)["steps"]
    assert weights["passed"] and not forward["passed"]
    (diff,) = forward["diffs"]
    assert diff["name"] == "output" and not diff["passed"] and diff["max_abs"] > 1e-5
    assert "output" in proc.stdout and "FAIL" in proc.stdout


@pytest.mark.timeout(120)
def test_map_suggest_prints_the_mapping_the_run_used(cnn_run, tmp_path):
    _, out = cnn_run
    proc = cli(["map", "--suggest", *CNN, "--no-create", "--out", str(tmp_path / "logs")])
    assert proc.returncode == ExitCode.ALIGNED, text(proc)[-3000:]
    suggested = tomllib.loads(proc.stdout)           # stdout is only the TOML
    assert suggested["keys"] == tomllib.loads((out / "automap.toml").read_text())["keys"]
    assert suggested["transform"] == [{"op": "transpose", "keys": ["classifier.0.weight", "classifier.2.weight"]}]
    assert "paired 16 tensors by call order" in proc.stderr


@pytest.mark.timeout(120)
def test_map_without_out_leaves_no_log_directory_behind_unless_it_fails(tmp_path):
    ok = cli(["map", "--suggest", *CNN, "--no-create"], TMPDIR=str(tmp_path))
    assert ok.returncode == ExitCode.ALIGNED, text(ok)[-3000:]
    assert not list(tmp_path.glob("lockstep-map-*"))
    bad = cli(["map", "--suggest", *CNN[:2], "--paddle-model", "no_such_module_xyz:build", "--no-create"],
              TMPDIR=str(tmp_path))
    assert bad.returncode == ExitCode.USAGE, text(bad)[-3000:]   # the spec names no module: a usage error
    assert "--paddle-model: factory 'no_such_module_xyz:build': no module 'no_such_module_xyz'" in bad.stderr
    (kept,) = tmp_path.glob("lockstep-map-*")
    assert f"worker logs kept in {kept}" in bad.stderr   # map's console does not wrap (soft_wrap)
    assert (kept / "paddle_worker.log").exists()


@pytest.mark.timeout(120)
def test_wrong_transform_in_a_mapping_file_is_caught_at_the_weights_step(cnn_run, tmp_path):
    _, out = cnn_run
    bad = (out / "automap.toml").read_text() + (
        '\n[[transform]]\nkeys = ["features.0.bias"]\nop = "reshape"\nshape = [2, 4]\n'
        '\n[[transform]]\nkeys = ["classifier.2.bias"]\nop = "transpose"\n')
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    proc = run(tmp_path / "r", *CNN, "--mapping", str(path))
    assert proc.returncode == ExitCode.USAGE, text(proc)[-3000:]
    msg = " ".join(proc.stdout.split())  # undo console wrapping
    assert "step 'weights'" in msg and "2 problem(s)" in msg
    assert "shape mismatch for torch 'features.0.bias' (8,) -> paddle 'conv1.bias': converted (2, 4) after " \
           "reshape(2, 4), paddle expects (8,)" in msg
    assert "on torch 'classifier.2.bias' (10,) -> paddle 'fc2.bias': a 1-D tensor has nothing to transpose" in msg


def steps_of(out: Path) -> dict:
    return {s["name"]: s for s in summary(out)["steps"]}


@pytest.mark.timeout(240)
def test_cnn_all_steps_skip_the_bert_only_ones_and_run_the_rest(tmp_path):
    """`--steps all` on a factory model: data/train/perf skipped with the reason, every other step
    runs (layers with its backward pass on the factory's loss, loss on the factory's loss,
    backward with the factory's optimizer recipe: SGD lr 0.01)."""
    out = tmp_path / "r"
    proc = cli(["run", "--steps", "all", "--out", str(out), "--no-create", *CNN], timeout=230)
    assert proc.returncode == ExitCode.ALIGNED, text(proc)[-3000:]
    assert set(summary(out)["steps_skipped"]) == {"data", "train", "perf"}
    html = (out / "report.html").read_text()
    assert html.count("SKIPPED</span>") == 3 and "it fine-tunes a text classifier" in html   # the report says so too
    assert "│ train" in proc.stdout and "SKIPPED" in proc.stdout                               # and the verdict table
    assert "step train skipped: it fine-tunes a text classifier" in " ".join(proc.stdout.split())
    steps = steps_of(out)
    assert list(steps) == ["metric", "weights", "forward", "layers", "loss", "lr", "backward"]
    assert all(s["status"] == "passed" for s in steps.values())
    layers = steps["layers"]["details"]
    assert layers["forward"]["compared"] == 12 and layers["backward"]["compared"] > 0   # the model itself pairs too
    assert steps["loss"]["details"]["loss"] == "the factory's loss"
    assert steps["loss"]["details"]["labels"] == "the model's labels input"
    opt = steps["backward"]["details"]["optimizer"]
    assert opt["torch"]["type"] == opt["paddle"]["type"] == "sgd"
    assert opt["torch"]["lr"] == opt["paddle"]["lr"] == 0.01 and opt["torch"]["weight_decay"] == 0.0


@pytest.mark.timeout(180)
def test_buggy_cnn_layers_and_loss_steps_name_the_layer(tmp_path):
    """Negative control: the layers step fails (not errors) on bn1, as its own error; the loss step
    fails and says the outputs already differ."""
    out = tmp_path / "r"
    proc = cli(["run", "--steps", "weights,forward,layers,loss", "--out", str(out), "--no-create",
                "--torch-model", "examples.cnn.torch_model:build",
                "--paddle-model", "examples.cnn_buggy.paddle_model:build"])
    assert proc.returncode == ExitCode.DIVERGED, text(proc)[-3000:]
    steps = steps_of(out)
    assert steps["layers"]["status"] == "failed", steps["layers"]["message"]
    first = steps["layers"]["details"]["forward"]["first"]
    assert (first["torch"], first["paddle"]) == ("features.1", "bn1")
    assert "features.1 [BatchNorm2d] (own error)" in steps["layers"]["message"]
    settings = steps["layers"]["details"]["forward"]["first"]["isolation"]["settings"]   # the bug, shown
    assert "eps=1e-05" in settings["torch"] and "epsilon=0.001" in settings["paddle"], settings
    assert "epsilon=0.001" in proc.stdout and "epsilon=0.001)</code>" in (out / "report.html").read_text()
    back = steps["layers"]["details"]["backward"]      # the backward phase's own negative control
    assert back["failed"] > 0 and back["first"]["what"] in ("grad", "param_grad"), back.get("first")
    assert steps["loss"]["status"] == "failed" and "the outputs already differ (output" in steps["loss"]["message"]


@pytest.mark.timeout(240)
def test_streamed_tensors_are_copied_straight_into_the_ring_and_the_older_path_still_works(tmp_path):
    """A capture's large torch tensors are copied by torch itself straight into the shared ring
    (torch_worker.adapter.to_wire; a GPU tensor: device to ring, no host array in between);
    LOCKSTEP_DIRECT_COPY=0 takes the older path through a numpy array. Both give the same rows.
    The buggy port (negative control) fails at bn1 on the older path too (the default path's
    negative control: test_buggy_cnn_layers_and_loss_steps_name_the_layer)."""
    rows = {}
    for mode in ("1", "0"):
        out = tmp_path / f"direct{mode}"
        proc = cli(["run", "--steps", "weights,layers", "--out", str(out), "--no-create", *CNN],
                   LOCKSTEP_DIRECT_COPY=mode)
        assert proc.returncode == ExitCode.ALIGNED, text(proc)[-3000:]
        layers = steps_of(out)["layers"]["details"]
        direct = layers["forward"]["stats"]["direct_copies"]
        if mode == "1":   # the conv/bn outputs (128 KB each) go into the ring; paddle has no such path
            assert direct["torch"] >= 3 and direct["paddle"] == 0, direct
            assert layers["backward"]["stats"]["direct_copies"]["torch"] >= 3
        else:
            assert direct == {"torch": 0, "paddle": 0}, direct
        assert layers["forward"]["failed"] == 0 and layers["forward"]["compared"] == 12
        rows[mode] = [(r["key"], r["max_abs"]) for r in layers["forward"]["rows"] + layers["backward"]["rows"]]
    assert rows["1"] == rows["0"]
    bad = tmp_path / "bad"
    proc = cli(["run", "--steps", "weights,layers", "--out", str(bad), "--no-create", *CNN[:2],
                "--paddle-model", "examples.cnn_buggy.paddle_model:build"], LOCKSTEP_DIRECT_COPY="0")
    assert proc.returncode == ExitCode.DIVERGED, text(proc)[-3000:]
    first = steps_of(bad)["layers"]["details"]["forward"]["first"]
    assert (first["torch"], first["paddle"], first["isolation"]["verdict"]) == ("features.1", "bn1", "own")


REGRESSION = """
import numpy as np
{imports}

class Net({base}):
    def __init__(self):
        super().__init__()
        self.fc = {linear}(3, 5)
        self.out = {linear}(5, 1)

    def forward(self, x, labels=None):
        return self.out({act}(self.fc(x)))

def build(seed=0):
    return {{"model": Net(),
            "inputs": [{{"name": "x", "shape": [6, 3], "dtype": "float32"}},
                       {{"name": "labels", "shape": [6, 1], "dtype": "float32"}}],
            "loss": lambda out, batch: ((out["output"] - {scale} * batch["labels"]) ** 2).mean(),
            "optimizer": {optimizer}}}
"""


def regression_pair(tmp_path: Path, paddle_scale: str = "1.0", optimizer: str = '{"type": "adam", "lr": 0.01}'
                    ) -> list[str]:
    """A tiny regression pair: float labels of shape [6, 1] (not class ids) and an MSE loss."""
    (tmp_path / "reg_torch.py").write_text(REGRESSION.format(
        imports="import torch", base="torch.nn.Module", linear="torch.nn.Linear", act="torch.tanh",
        scale="1.0", optimizer=optimizer))
    (tmp_path / "reg_paddle.py").write_text(REGRESSION.format(
        imports="import paddle", base="paddle.nn.Layer", linear="paddle.nn.Linear", act="paddle.tanh",
        scale=paddle_scale, optimizer=optimizer))
    return ["--torch-model", "reg_torch:build", "--torch-path", str(tmp_path),
            "--paddle-model", "reg_paddle:build", "--paddle-path", str(tmp_path)]


@pytest.mark.timeout(240)
def test_a_regression_factory_keeps_its_float_labels_and_its_adam_recipe(tmp_path):
    """The factory's own labels reach its loss unchanged (float [6, 1]) in layers, loss and backward,
    and its Adam recipe is what both sides train with. Negative controls: a loss that differs on
    the paddle side (the outputs agree), and a recipe lockstep cannot build."""
    out = tmp_path / "ok"
    steps = "weights,forward,layers,loss,backward"
    proc = cli(["run", "--steps", steps, "--out", str(out), "--no-create", *regression_pair(tmp_path)])
    assert proc.returncode == ExitCode.ALIGNED, text(proc)[-3000:]
    s = steps_of(out)
    assert s["layers"]["details"]["backward"]["compared"] > 0
    assert s["loss"]["details"]["labels"] == "the model's labels input"
    opt = s["backward"]["details"]["optimizer"]
    assert opt["torch"]["type"] == opt["paddle"]["type"] == "adam" and opt["torch"]["lr"] == 0.01

    bad = tmp_path / "bad"
    bad.mkdir()
    proc = cli(["run", "--steps", "weights,forward,loss", "--out", str(bad / "r"), "--no-create",
                *regression_pair(bad, paddle_scale="1.01")])
    assert proc.returncode == ExitCode.DIVERGED, text(proc)[-3000:]
    loss = steps_of(bad / "r")["loss"]
    assert loss["status"] == "failed" and "the outputs agree, so look at the loss function" in loss["message"]

    odd = tmp_path / "odd"
    odd.mkdir()
    proc = cli(["run", "--steps", "weights,backward", "--out", str(odd / "r"), "--no-create",
                *regression_pair(odd, optimizer='{"type": "rmsprop", "lr": 0.01}')])
    assert proc.returncode == ExitCode.USAGE, text(proc)[-3000:]
    assert "optimizer recipe type 'rmsprop' is not supported (known: adamw, adam, sgd)" in " ".join(proc.stdout.split())


# -- factory errors --------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_factory_import_error_shows_the_worker_traceback(tmp_path):
    (tmp_path / "broken_factory.py").write_text("import torch\n\nimport nonexistent_dependency_xyz\n\n"
                                                "def build():\n    return torch.nn.Linear(2, 2)\n")
    proc = run(tmp_path / "r", "--torch-model", "broken_factory:build", "--torch-path", str(tmp_path),
               "--paddle-model", "examples.cnn.paddle_model:build")
    assert proc.returncode == ExitCode.WORKER_ERROR, text(proc)[-3000:]
    out = proc.stdout
    assert "torch worker failed in op 'load_model'" in out
    assert "--- torch worker traceback (op 'load_model') ---" in out
    assert f'{tmp_path / "broken_factory.py"}", line 3' in out.replace("\n", "")
    assert "No module named 'nonexistent_dependency_xyz'" in out


@pytest.mark.timeout(120)
def test_factory_returning_the_wrong_type_is_named(tmp_path):
    (tmp_path / "wrong_paddle.py").write_text("def build():\n    return {'model': 'not a layer'}\n")
    proc = run(tmp_path / "r", *CNN[:2], "--paddle-model", "wrong_paddle:build", "--paddle-path", str(tmp_path))
    assert proc.returncode == ExitCode.WORKER_ERROR, text(proc)[-3000:]
    msg = " ".join(proc.stdout.split())
    assert "paddle worker failed in op 'load_model': TypeError: factory 'wrong_paddle:build': 'model' is a " \
           "builtins.str, not a paddle.nn.Layer" in msg


@pytest.mark.frameworks
@pytest.mark.parametrize("port,expect", [("cnn", 0), ("cnn_buggy", 1)])
def test_cnn_factory_backward(tmp_path, port, expect):
    """Factory models train on their own output; BatchNorm running stats are not parameters.

    conv biases feeding BatchNorm have a ~0 true gradient that Adam turns into lr-sized noise,
    hence the looser parameter tolerance (docs/own-model.md). The buggy port (BatchNorm eps)
    must still fail, at iteration 0, on the loss.
    """
    from real_envs import real_run
    proc = real_run(["--steps", "weights,backward", "--iters", "2", "--tolerance", "backward.param=max:1e-4",
                     "--torch-model", "examples.cnn.torch_model:build",
                     "--paddle-model", f"examples.{port}.paddle_model:build"], tmp_path / "r")
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-2000:]
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    bwd = s["steps"][-1]
    if expect:
        assert "iteration 0 (loss_0)" in bwd["message"]
    else:
        assert "12 gradients and parameters" in bwd["message"]


HELLO_WITHOUT_PADDLENLP = """
import builtins, json, sys
real_import = builtins.__import__
def no_paddlenlp(name, *a, **k):
    if name == "paddlenlp" or name.startswith("paddlenlp."):
        raise ModuleNotFoundError("No module named 'paddlenlp'")
    return real_import(name, *a, **k)
builtins.__import__ = no_paddlenlp
from paddle_worker.adapter import PaddleAdapter
print(json.dumps(PaddleAdapter().hello()["libraries"]))
"""


@pytest.mark.timeout(180)
def test_paddle_worker_says_hello_without_paddlenlp():
    """An own-model pair needs paddle alone (seen on a GPU host where only paddlepaddle could be
    installed): the handshake reports paddlenlp as missing instead of failing the worker's start.
    The control: with paddlenlp importable, its version is reported."""
    out = run_in_env("paddle", HELLO_WITHOUT_PADDLENLP)
    assert out.returncode == 0, out.stderr[-2000:]
    libs = json.loads(out.stdout.strip().splitlines()[-1])
    assert libs["paddlenlp"].startswith("not importable (ModuleNotFoundError"), libs
    control = run_in_env("paddle", "import json; from paddle_worker.adapter import PaddleAdapter; "
                                   "print(json.dumps(PaddleAdapter().hello()['libraries']))")
    assert control.returncode == 0, control.stderr[-2000:]
    assert json.loads(control.stdout.strip().splitlines()[-1])["paddlenlp"][0].isdigit()


TOKNET_TORCH = '''
import torch
import torch.nn.functional as F
from torch import nn

class TokNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(40, 16)
        self.ln = nn.LayerNorm(16)
        self.cls = nn.Linear(16, 2)

    def forward(self, input_ids, labels=None):
        return self.cls(self.ln(self.tok(input_ids))[:, 0])

def build(seed=0):
    torch.manual_seed(seed)
    return {"model": TokNet(),
            "inputs": [{"name": "input_ids", "shape": [4, 5], "dtype": "int64", "low": 0, "high": 40},
                       {"name": "labels", "shape": [4], "dtype": "int64", "low": 0, "high": 2}],
            "loss": lambda o, b: F.cross_entropy(o["output"], b["labels"]),
            "optimizer": {"type": "adamw", "lr": 1e-2, "weight_decay": 0.1, "no_decay": ["bias", "ln."]}}
'''

TOKNET_PADDLE = '''
import paddle
import paddle.nn.functional as F
from paddle import nn

class TokNet(nn.Layer):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(40, 16)
        self.norm = nn.LayerNorm(16)
        self.classifier = nn.Linear(16, 2)

    def forward(self, input_ids, labels=None):
        return self.classifier(self.norm(self.word_embeddings(input_ids))[:, 0])

def build():
    out = {"model": TokNet(), "loss": lambda o, b: F.cross_entropy(o["output"], b["labels"])}
    NO_DECAY
    return out
'''


@pytest.mark.timeout(240)
def test_weight_decay_groups_follow_the_mapping_not_each_sides_names(tmp_path):
    """A factory's `no_decay` patterns name torch's parameters (`ln.`); the port calls its LayerNorm
    `norm`. Paddle decays what torch decays, by the mapping, and the backward step aligns.
    Negative control: a paddle factory with its own patterns that miss the LayerNorm is used and
    flagged (its LayerNorm weight decays on paddle only)."""
    (tmp_path / "tok_torch.py").write_text(TOKNET_TORCH)
    (tmp_path / "tok_paddle.py").write_text(TOKNET_PADDLE.replace("NO_DECAY", "pass"))
    args = ["--torch-model", "tok_torch:build", "--paddle-model", "tok_paddle:build",
            "--torch-path", str(tmp_path), "--paddle-path", str(tmp_path)]
    proc = cli(["run", "--steps", "weights,backward", "--out", str(tmp_path / "ok"), "--no-create", *args])
    assert proc.returncode == ExitCode.ALIGNED, text(proc)[-3000:]
    opt = steps_of(tmp_path / "ok")["backward"]["details"]["optimizer"]
    assert opt["torch"]["decayed"] == opt["paddle"]["decayed"] == 2 and opt["paddle"]["not_decayed"] == 3, opt

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tok_torch.py").write_text(TOKNET_TORCH)
    (bad / "tok_paddle.py").write_text(TOKNET_PADDLE.replace(
        "NO_DECAY", 'out["optimizer"] = {"type": "adamw", "no_decay": ["bias"]}'))
    args = [a.replace(str(tmp_path), str(bad)) for a in args]
    proc = cli(["run", "--steps", "weights,backward", "--out", str(bad / "r"), "--no-create", *args])
    assert proc.returncode == ExitCode.DIVERGED, text(proc)[-3000:]
    assert "decayed on paddle only (first: norm.weight)" in steps_of(bad / "r")["backward"]["message"]


OWN = ROOT / "tests" / "data" / "own_models"


@pytest.mark.timeout(300)
def test_a_transformer_port_with_packed_qkv_aligns_and_a_kv_swap_is_pinned(tmp_path):
    """torch.nn.TransformerEncoderLayer (q/k/v packed in in_proj_weight, out_proj applied
    functionally) against paddle's (q_proj/k_proj/v_proj, out_proj called as a layer), mapped with
    a split. The correct port aligns in every step: MultiheadAttention pairs with paddle's layer
    through its split parameters, out_proj's paddle-only output is noted and not failed, and the
    SGD recipe's weight decay groups match through the split. Negative control: the same port
    with k and v swapped in the mapping (the weights step cannot see it) fails, first at
    layer.self_attn, as its own error."""
    args = ["--torch-model", "attn_torch:build", "--paddle-model", "attn_paddle:build",
            "--torch-path", str(OWN), "--paddle-path", str(OWN)]
    out = tmp_path / "ok"
    proc = cli(["run", "--steps", "weights,forward,layers,backward", "--out", str(out), "--no-create",
                "--mapping", str(OWN / "attn_map.toml"), *args])
    assert proc.returncode == ExitCode.ALIGNED, text(proc)[-3000:]
    s = steps_of(out)
    pairs = {p["torch"]: p["paddle"] for p in s["layers"]["details"]["map"]["pairs"]}
    assert pairs["layer.self_attn"] == "layer.self_attn"
    assert s["layers"]["details"]["forward"]["one_side_only"] == {
        "paddle": ["layer.self_attn.out_proj (forward output)"]}
    opt = s["backward"]["details"]["optimizer"]        # every parameter decays (the recipe has no no_decay):
    assert (opt["torch"]["decayed"], opt["paddle"]["decayed"]) == (16, 20)   # in_proj_* -> q/k/v_proj

    swapped = tmp_path / "kv.toml"
    swapped.write_text((OWN / "attn_map.toml").read_text().replace('["q", "k", "v"]', '["q", "v", "k"]'))
    proc = cli(["run", "--steps", "weights,forward,layers", "--out", str(tmp_path / "kv"), "--no-create",
                "--mapping", str(swapped), *args])
    assert proc.returncode == ExitCode.DIVERGED, text(proc)[-3000:]
    s = steps_of(tmp_path / "kv")
    assert s["weights"]["status"] == "passed"
    first = s["layers"]["details"]["forward"]["first"]
    assert first["torch"] == "layer.self_attn" and first["isolation"]["verdict"] == "own"


@pytest.mark.timeout(300)
def test_an_lstm_port_maps_automatically_and_a_time_major_bug_is_pinned(tmp_path):
    """paddle's fused nn.LSTM also lists its weights under its cell's names (one tensor, two
    names): automatic mapping pairs the LSTM alone, and the layers step's backward pass runs
    (paddle's RNN op has no backward in eval mode; with dropout 0 its train mode is the same).
    Negative control: the port built with time_major=True, pinned at the LSTM as its own error."""
    args = ["--torch-model", "lstm_torch:build", "--torch-path", str(OWN), "--paddle-path", str(OWN)]
    out = tmp_path / "ok"
    proc = cli(["run", "--steps", "weights,forward,layers,backward", "--out", str(out), "--no-create",
                "--paddle-model", "lstm_paddle:build", *args])
    assert proc.returncode == ExitCode.ALIGNED, text(proc)[-3000:]
    s = steps_of(out)
    assert s["layers"]["details"]["backward"]["compared"] > 0
    assert "rnn.weight_ih_l0" in (out / "automap.toml").read_text()

    (tmp_path / "lstm_time_major.py").write_text(
        "import lstm_paddle\nlstm_paddle.LSTM_ARGS['time_major'] = True\nbuild = lstm_paddle.build\n")
    proc = cli(["run", "--steps", "weights,forward,layers", "--out", str(tmp_path / "bug"), "--no-create",
                "--paddle-model", "lstm_time_major:build", "--paddle-path", str(tmp_path), *args])
    assert proc.returncode == ExitCode.DIVERGED, text(proc)[-3000:]
    first = steps_of(tmp_path / "bug")["layers"]["details"]["forward"]["first"]
    assert first["torch"] == "lstm" and first["isolation"]["verdict"] == "own", first


@pytest.mark.timeout(300)
def test_a_failing_backward_pass_keeps_the_forward_diagnosis(tmp_path):
    """The layers step's backward pass failing in a worker (here: the port's loss raises) does not
    lose what the forward pass found: the buggy CNN still names bn1 and exits 1, saying backward was
    not compared and how to skip it. Control: on the correct port the failure is the worker's
    error (exit 7), with the same hint."""
    for name, port in (("raise_buggy", "examples.cnn_buggy.paddle_model"), ("raise_ok", "examples.cnn.paddle_model")):
        (tmp_path / f"{name}.py").write_text(
            f"from {port} import build as _build\n\n"
            "def _loss(outputs, batch):\n    raise RuntimeError('this port has no backward yet')\n\n"
            "def build():\n    d = _build()\n    d['loss'] = _loss\n    return d\n")
    common = ["--steps", "weights,layers", "--no-create", *CNN[:2], "--paddle-path", str(tmp_path)]
    proc = cli(["run", "--out", str(tmp_path / "bug"), "--paddle-model", "raise_buggy:build", *common])
    assert proc.returncode == ExitCode.DIVERGED, text(proc)[-3000:]
    layers = steps_of(tmp_path / "bug")["layers"]
    assert layers["details"]["forward"]["first"]["paddle"] == "bn1"
    assert "this port has no backward yet" in layers["details"]["backward"]["error"]
    assert "--param layers_backward=false" in layers["details"]["backward"]["hint"]
    proc = cli(["run", "--out", str(tmp_path / "ok"), "--paddle-model", "raise_ok:build", *common])
    assert proc.returncode == ExitCode.WORKER_ERROR, text(proc)[-3000:]
    assert "--param layers_backward=false compares the forward pass alone" in proc.stdout


@pytest.mark.timeout(300)
def test_activations_next_to_a_batchnorm_are_paired_and_a_tanh_gelu_is_pinned(tmp_path):
    """paddle keeps BatchNorm's running statistics as parameters, torch as buffers; the layer map
    compares what each side holds without them, so the model containing a BatchNorm still pairs
    and its activations are compared. Negative control: GELU(approximate=True) in the port (the
    forward step alone passes it: 9e-7 < 1e-5) is pinned at that GELU as its own error."""
    args = ["--torch-model", "conv1d_torch:build", "--torch-path", str(OWN), "--paddle-path", str(OWN),
            "--steps", "weights,forward,layers", "--no-create"]
    proc = cli(["run", "--out", str(tmp_path / "ok"), "--paddle-model", "conv1d_paddle:build", *args])
    assert proc.returncode == ExitCode.ALIGNED, text(proc)[-3000:]
    layer_map = steps_of(tmp_path / "ok")["layers"]["details"]["map"]
    pairs = {p["torch"]: p["paddle"] for p in layer_map["pairs"]}
    assert pairs["act2"] == "a2" and pairs[""] == "" and layer_map["unmapped"] == []

    (tmp_path / "gelu_tanh.py").write_text(
        "import conv1d_paddle\nconv1d_paddle.GELU_ARGS['approximate'] = True\nbuild = conv1d_paddle.build\n")
    proc = cli(["run", "--out", str(tmp_path / "bug"), "--paddle-model", "gelu_tanh:build",
                "--paddle-path", str(tmp_path), *args])
    assert proc.returncode == ExitCode.DIVERGED, text(proc)[-3000:]
    s = steps_of(tmp_path / "bug")
    assert s["forward"]["status"] == "passed"
    first = s["layers"]["details"]["forward"]["first"]
    assert first["torch"] == "act2" and first["isolation"]["verdict"] == "own", first


@pytest.mark.timeout(300)
def test_tied_weights_are_paired_once_and_an_untied_port_is_refused(tmp_path):
    """torch's state dict lists a tied weight under both names (head.weight is emb.weight); the
    automatic mapping pairs the tensor once and ignores the second name, and every step aligns.
    Negative control: a port with its own untied output matrix is refused, naming that layer."""
    args = ["--torch-model", "tied_torch:build", "--torch-path", str(OWN), "--paddle-path", str(OWN),
            "--no-create"]
    out = tmp_path / "ok"
    proc = cli(["run", "--steps", "weights,forward,layers,backward", "--out", str(out),
                "--paddle-model", "tied_paddle:build", *args])
    assert proc.returncode == ExitCode.ALIGNED, text(proc)[-3000:]
    assert 'torch = ["head\\\\.weight$"]' in (out / "automap.toml").read_text()

    (tmp_path / "untied.py").write_text("import tied_paddle\ntied_paddle.UNTIE = True\nbuild = tied_paddle.build\n")
    proc = cli(["run", "--steps", "weights", "--out", str(tmp_path / "bug"), "--paddle-model", "untied:build",
                "--paddle-path", str(tmp_path), *args])
    assert proc.returncode == ExitCode.USAGE, text(proc)[-3000:]
    assert "paddle module out" in " ".join(proc.stdout.split())


@pytest.mark.timeout(300)
def test_debug_never_overwrites_a_run_and_refuses_a_file_as_out(tmp_path):
    """`debug --out DIR` where DIR holds a run (or an earlier session) starts a fresh DIR/HHMMSS
    inside it, as `run` does: the first report stays. A file as --out is a usage error (2), not a
    traceback."""
    def debug(out: Path) -> subprocess.CompletedProcess:
        return cli(["debug", "--out", str(out), "--no-create", "--param", "layers_backward=false", *CNN],
                   timeout=240, input="quit\n")
    first = debug(tmp_path / "s")
    assert first.returncode == ExitCode.ALIGNED, text(first)[-3000:]
    before = (tmp_path / "s" / "summary.json").read_bytes()
    second = debug(tmp_path / "s")
    assert second.returncode == ExitCode.ALIGNED, text(second)[-3000:]
    assert (tmp_path / "s" / "summary.json").read_bytes() == before
    assert len([d for d in (tmp_path / "s").iterdir() if d.is_dir() and (d / "summary.json").exists()]) == 1
    (tmp_path / "afile").write_text("x")
    proc = debug(tmp_path / "afile")
    assert proc.returncode == ExitCode.USAGE and "exists and is not a directory" in proc.stdout + proc.stderr, text(proc)[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.timeout(240)
def test_an_inject_the_worker_does_not_apply_is_a_usage_error(tmp_path):
    """Each worker's HELLO lists the bugs it can inject; a name it does not know is the command
    line's fault, exit 2 naming the flag, before any step (a misspelt negative control used to run
    as a silent no-op on the torch side). A BERT-only bug on a factory model is refused too."""
    for side, item in (("paddle", "bogus_thing"), ("torch", "metric_argmn")):
        proc = run(tmp_path / side, *CNN, f"--{side}-inject", item)
        assert proc.returncode == ExitCode.USAGE, text(proc)[-3000:]
        said = " ".join(proc.stdout.split())
        assert f"--{side}-inject '{item}': the {side} worker applies no such bug (known: " in said
        assert "step weights ..." not in proc.stdout
    proc = run(tmp_path / "bert_only", *CNN, "--paddle-inject", "ln_eps:0:1e-3")
    assert proc.returncode == ExitCode.USAGE, text(proc)[-3000:]
    assert "--paddle-inject: inject ['ln_eps:0:1e-3'] applies to the BERT presets only" in " ".join(proc.stdout.split())


@pytest.mark.timeout(240)
def test_the_debug_sessions_report_has_the_rows_the_first_divergence_and_the_commands(tmp_path):
    """report.html of `coordinator debug`: the per-layer rows and curve, the first divergence with
    the verdict of the replay the session ran on it, and the session's commands (it used to hold
    the step table only)."""
    out = tmp_path / "d"
    proc = cli(["debug", "--out", str(out), "--no-create", "--param", "layers_backward=false",
                "--torch-model", "examples.cnn.torch_model:build",
                "--paddle-model", "examples.cnn_buggy.paddle_model:build"], timeout=200, input="replay\nquit\n")
    assert proc.returncode == ExitCode.DIVERGED, text(proc)[-3000:]
    dbg = steps_of(out)["debug"]["details"]
    assert dbg["forward"]["failed"] > 0 and dbg["forward"]["first"]["isolation"]["verdict"] == "own"
    html = (out / "report.html").read_text()
    assert "forward: first divergent layer" in html and "<svg" in html
    assert "session: 2 command(s)" in html and "<code>replay</code>" in html and "own" in html
