"""The factory contract helpers (protocol/factory.py), with numpy arrays standing in for tensors."""

from collections import OrderedDict

import numpy as np
import pytest

from protocol import factory as F


class Model:  # stands in for torch.nn.Module / paddle.nn.Layer
    def __call__(self, x):
        return x


def is_model(x):
    return isinstance(x, Model)


def norm(result, spec="pkg.mod:build"):
    return F.normalize(spec, result, is_model, "fake.Model", np.asarray)


def test_bare_model_and_dict_with_example_inputs_and_specs():
    m = Model()
    assert norm(m).model is m and norm(m).inputs is None
    loaded = norm({"model": m, "inputs": {"x": [[1, 2]]}, "loss": lambda o, b: 0, "optimizer": {"type": "sgd"}})
    assert loaded.inputs[0]["name"] == "x" and loaded.inputs[0]["value"].tolist() == [[1, 2]]
    spec = norm({"model": m, "inputs": [{"name": "ids", "shape": (2, 3), "dtype": "int64", "low": 1, "high": 9}]})
    assert spec.inputs == [{"name": "ids", "shape": [2, 3], "dtype": "int64", "low": 1, "high": 9}]
    info = F.model_info("pkg.mod:build", loaded, 10)
    assert info["kind"] == "factory" and info["loss"] is True and info["optimizer"] == {"type": "sgd"}
    assert info["supports"]["forward"] and not info["supports"]["data"]


def test_object_with_model_attribute():
    class Bundle:
        model = Model()
    assert is_model(norm(Bundle()).model)


@pytest.mark.parametrize("result,needle", [
    ("a string", "factory 'pkg.mod:build' returned a builtins.str; expected a fake.Model or a dict with 'model'"),
    ({"model": 3}, "'model' is a builtins.int, not a fake.Model"),
    ({"model": Model(), "loss": 1.0}, "'loss' must be callable(outputs, batch)"),
    ({"model": Model(), "inputs": 5}, "'inputs' must be a dict name -> array or a list of input specs"),
    ({"model": Model(), "inputs": [{"shape": [1]}]}, "inputs[0] must be a dict with 'name' and 'shape'"),
    ({"model": Model(), "inputs": [{"name": "x", "shape": [1], "dtype": "nonsense"}]}, "unknown dtype 'nonsense'"),
])
def test_wrong_return_types_name_the_factory_and_the_type(result, needle):
    with pytest.raises(TypeError) as e:
        norm(result)
    assert needle in str(e.value)


def test_output_naming():
    a, b = np.zeros(1), np.ones(2)
    is_t = lambda x: isinstance(x, np.ndarray)  # noqa: E731
    assert F.name_outputs(a, is_t) == {"output": a}
    assert list(F.name_outputs((a, b), is_t)) == ["output_0", "output_1"]
    out = F.name_outputs(OrderedDict(logits=a, hidden_states=(a, b), loss=None), is_t)
    assert list(out) == ["logits", "hidden_states_0", "hidden_states_1"]
    with pytest.raises(TypeError, match="no tensors"):
        F.name_outputs("text", is_t)


def test_import_factory_errors_name_the_spec_and_search_path(tmp_path):
    (tmp_path / "userpkg_lockstep_test.py").write_text("def build(seed=0):\n    return seed\nthing = 3\n")
    fn = F.import_factory("userpkg_lockstep_test:build", [str(tmp_path)])
    assert F.call_factory(fn, 7) == 7
    with pytest.raises(F.FactorySpecError, match=r"no module 'no_such_mod_xyz' on this worker's sys.path"):
        F.import_factory("no_such_mod_xyz:build", [str(tmp_path)])
    with pytest.raises(F.FactorySpecError, match="has no attribute 'nope'"):
        F.import_factory("userpkg_lockstep_test:nope", [str(tmp_path)])
    with pytest.raises(F.FactorySpecError, match="is a int, not a function"):
        F.import_factory("userpkg_lockstep_test:thing", [str(tmp_path)])
    # a dependency missing *inside* the user's module is not a typo in the spec: it stays itself
    (tmp_path / "userpkg_needs_dep.py").write_text("import no_such_dependency_xyz\ndef build():\n    pass\n")
    with pytest.raises(ModuleNotFoundError) as dep:
        F.import_factory("userpkg_needs_dep:build", [str(tmp_path)])
    assert not isinstance(dep.value, F.FactorySpecError) and dep.value.name == "no_such_dependency_xyz"
    with pytest.raises(F.FactorySpecError, match="use module.path:function"):
        F.import_factory("userpkg_lockstep_test:", [])
