"""Which weights are pickles, and the refusal that names the file and the way out."""

import json

import pytest

from quantkit.models.pickles import pickle_weights, require_trusted, trusting_pickle
from quantkit.util.errors import QuantkitError


def test_which_files_are_read_as_pickles(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    assert pickle_weights(d) == []
    (d / "pytorch_model.bin").write_bytes(b"x")
    assert pickle_weights(d) == [str(d / "pytorch_model.bin")]
    (d / "model.safetensors").write_bytes(b"x")               # safetensors are read instead
    assert pickle_weights(d) == []
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "w-1.bin", "b": "w-2.bin"}}))
    assert pickle_weights(d) == [str(d / "w-1.bin"), str(d / "w-2.bin")]    # the index says so
    (d / "model.safetensors.index.json").write_text("{}")
    assert pickle_weights(d) == []
    assert pickle_weights(tmp_path / "nope") == []


def test_refused_unless_trusted(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(QuantkitError) as e:
        require_trusted(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "pytorch_model.bin") in msg
    assert "--trust-pickle" in msg and "save_file" in msg and "model.safetensors" in msg
    require_trusted(tmp_path, trust=True)
    with trusting_pickle():
        require_trusted(tmp_path)
        with trusting_pickle(False):
            with pytest.raises(QuantkitError):
                require_trusted(tmp_path)
    with pytest.raises(QuantkitError):
        require_trusted(tmp_path)
