"""config.json values of a Hugging Face model, typed and ranged: a string where a number belongs,
a negative context, zero heads, KV heads that do not divide the heads, an odd head dimension.
Each is one line naming config.json and the key, the same for the converter (HFSource, which
inspect and quantize use) and for plan; a valid config reads as before."""

import json
import shutil

import pytest

from quantkit.cli import main
from quantkit.models.hf import HFSource
from quantkit.models.hf_config import check_config
from quantkit.plan.model import load as plan_load
from quantkit.util.errors import QuantkitError
from helpers.cli import assert_one_line
from helpers.tiny_models import build_hf_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_hf_model("llama", tmp_path_factory.mktemp("cfg"))


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, val in changes.items():
        if val is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = val
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


_DROP = object()

CASES = [
    ({"rope_theta": "abc"}, "rope_theta", "is a string, not a number"),
    ({"rope_theta": "10000"}, "rope_theta", "is a string, not a number"),
    ({"rope_theta": -1.0}, "rope_theta", "out of range"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps", "not a number"),
    ({"rms_norm_eps": 0}, "rms_norm_eps", "out of range"),
    ({"rms_norm_eps": 5.0}, "rms_norm_eps", "out of range"),
    ({"max_position_embeddings": -5}, "max_position_embeddings", "out of range"),
    ({"max_position_embeddings": 1.5}, "max_position_embeddings", "not an integer"),
    ({"max_position_embeddings": 2 ** 40}, "max_position_embeddings", "out of range"),
    ({"num_attention_heads": 0}, "num_attention_heads", "out of range"),
    ({"num_attention_heads": -4}, "num_attention_heads", "out of range"),
    ({"num_attention_heads": "4"}, "num_attention_heads", "not an integer"),
    ({"num_key_value_heads": 3}, "num_key_value_heads", "does not divide num_attention_heads 4"),
    ({"num_key_value_heads": 8}, "num_key_value_heads", "does not divide"),
    ({"num_key_value_heads": -2}, "num_key_value_heads", "out of range"),
    ({"head_dim": 7}, "head_dim", "is odd"),
    ({"head_dim": 0}, "head_dim", "out of range"),
    ({"head_dim": "16"}, "head_dim", "not an integer"),
    ({"hidden_size": 66, "head_dim": _DROP}, "hidden_size", "not a multiple of num_attention_heads 4"),
    ({"hidden_size": True}, "hidden_size", "not an integer"),
    ({"num_hidden_layers": 1e10}, "num_hidden_layers", "not an integer"),
    ({"intermediate_size": [128]}, "intermediate_size", "is a list, not an integer"),
    ({"vocab_size": 0}, "vocab_size", "out of range"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings", "not true or false"),
    ({"architectures": "LlamaForCausalLM"}, "architectures", "not a list of class names"),
    ({"rope_scaling": [2.0]}, "rope_scaling", "is a list, not an object"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling.factor", "not a number"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "rope_scaling.factor", "out of range"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}},
     "rope_scaling.original_max_position_embeddings", "out of range"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling.original_max_position_embeddings",
     "is missing"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}}, "rope_scaling.high_freq_factor",
     "is not above low_freq_factor 4.0"),
    ({"sliding_window": -1}, "sliding_window", "out of range"),
    ({"text_config": "llama"}, "text_config", "not an object"),
    ({"text_config": {"num_attention_heads": 0}}, "text_config.num_attention_heads", "out of range"),
    ({"model_type": 5}, "model_type", "not a string"),
    ({"rope_theta": "x" * 100_000}, "rope_theta", "not a number"),
]


@pytest.mark.parametrize("changes,key,problem", CASES, ids=lambda x: str(x)[:50])
def test_bad_config_value_named_by_every_reader(llama_dir, tmp_path, capsys, changes, key, problem):
    d = _edited(llama_dir, tmp_path / "m", **changes)
    cfg = str(d / "config.json")
    with pytest.raises(QuantkitError) as e:
        HFSource(d)
    msg = str(e.value)
    assert msg.startswith(cfg + ": " + key + " ") and problem in msg and len(msg) < 700, msg
    with pytest.raises(QuantkitError) as e:
        plan_load(str(d))
    assert str(e.value) == msg                                   # the same line on the plan path
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["inspect", str(d)], ["plan", str(d)],
                 ["quantize", str(d), "--format", "gguf:q8_0", "-o", str(tmp_path / "o.gguf")]):
        assert main(argv) == 2
        assert_one_line(capsys.readouterr().err, "config.json", key, problem)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_valid_configs_read_as_before(llama_dir, tmp_path):
    """Keys checked only when present; nulls, a sliding window of false and a head_dim that
    differs from hidden / heads (Gemma) are all fine."""
    d = _edited(llama_dir, tmp_path / "m", head_dim=16, sliding_window=None, rope_scaling=None)
    src = HFSource(d, tokenizer=False)
    assert (src.spec.n_head, src.spec.n_head_kv, src.spec.head_dim, src.spec.n_ctx_train) == (4, 2, 16, 256)
    m = plan_load(str(d))
    assert (m.n_head, m.n_head_kv, m.head_dim, m.n_ctx_train) == (4, 2, 16, 256)
    check_config({"hidden_size": 640, "num_attention_heads": 4, "head_dim": 256, "num_key_value_heads": 1,
                  "sliding_window": False, "rope_theta": 1000000, "torch_dtype": "bfloat16",
                  "text_config": {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}}, None)
    with pytest.raises(QuantkitError, match="^config.json: config.json holds a list"):
        check_config([1, 2], None)


def test_deeply_nested_config_is_one_line(llama_dir, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    (d / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    for argv in (["inspect", str(d)], ["plan", str(d)]):
        assert main(argv) == 2
        assert_one_line(capsys.readouterr().err, "config.json")
