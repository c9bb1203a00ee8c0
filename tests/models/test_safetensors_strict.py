"""The safetensors header reader: every rule of the format (and of the safetensors library's own
validation) broken once, each refused with one line naming the file and the problem."""

import json
import struct

import pytest

from helpers.cli import assert_one_line, run_cli
from quantkit.models.safetensors_file import SafetensorsFile
from quantkit.util.errors import QuantkitError


def st_bytes(header, data_len=None, raw_header=None) -> bytes:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    if data_len is None:
        data_len = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    return struct.pack("<Q", len(h)) + h + b"\0" * data_len


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}


def _with(name, **kw):
    h = json.loads(json.dumps(GOOD))
    h[name].update(kw)
    return h


BAD = {
    "header is a list": (dict(header=[], raw_header=b"[]", data_len=0), "not an object"),
    "entry without dtype": (dict(header={"a": {"shape": [1], "data_offsets": [0, 4]}}), "has no dtype"),
    "unknown dtype": (dict(header=_with("a", dtype="F128")), "unknown dtype"),
    "negative dimension": (dict(header=_with("a", shape=[-2, 2])), "non-negative integers"),
    "size does not match the shape": (dict(header=_with("a", shape=[2, 3])), "bytes for shape [2, 3] of F32"),
    "offsets claim a terabyte": (dict(header=_with("b", data_offsets=[16, 1 << 40]), data_len=24), "past the end"),
    "descending offsets": (dict(header=_with("b", data_offsets=[24, 16])), "ascending"),
    "overlap": (dict(header={**GOOD, "c": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}), "overlap"),
    "gap": (dict(header=_with("b", data_offsets=[20, 28])), "belong to no tensor"),
    "trailing bytes": (dict(header=GOOD, data_len=40), "after the last tensor"),
    "duplicate tensor name": (dict(header=None, raw_header=b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                                   b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', data_len=2),
                              "appears twice"),
    "metadata not strings": (dict(header={**GOOD, "__metadata__": {"format": 1}}), "__metadata__"),
    "header length past the file": (dict(header=None, raw_header=b"{}", data_len=0), None),
    "not JSON": (dict(header=None, raw_header=b"{\"a\": ", data_len=0), "not JSON"),
}


def _write(tmp_path, case):
    kw, needle = BAD[case]
    p = tmp_path / "model.safetensors"
    b = st_bytes(kw["header"], kw.get("data_len"), kw.get("raw_header"))
    if case == "header length past the file":
        b = struct.pack("<Q", 1 << 62) + b[8:]
        needle = "exceeds the file"
    p.write_bytes(b)
    return p, needle


def test_the_base_file_is_valid(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(st_bytes(GOOD))
    with SafetensorsFile(p) as f:
        assert {k: (e.dtype, e.shape, e.nbytes) for k, e in f.entries.items()} == \
            {"a": ("F32", (2, 2), 16), "b": ("BF16", (4,), 8)}


def test_sub_byte_dtypes_are_sized_in_bits(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(st_bytes({"a": {"dtype": "F4", "shape": [3, 4], "data_offsets": [0, 6]}}))
    with SafetensorsFile(p) as f:
        assert f.entries["a"].nbytes == 6


@pytest.mark.parametrize("case", sorted(BAD))
def test_broken_rule_is_one_line(tmp_path, case):
    p, needle = _write(tmp_path, case)
    with pytest.raises(QuantkitError) as e:
        SafetensorsFile(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_a_huge_tensor_name_is_cut_in_the_message(tmp_path):
    name = "n" * 100_000
    p = tmp_path / "model.safetensors"
    p.write_bytes(st_bytes({name: {"dtype": "F32", "shape": [2], "data_offsets": [0, 9]}}))
    with pytest.raises(QuantkitError) as e:
        SafetensorsFile(p)
    assert len(str(e.value)) < 300 + len(str(p))


@pytest.mark.parametrize("case", ["overlap", "offsets claim a terabyte", "unknown dtype"])
def test_plan_refuses_in_one_line(tmp_path, capsys, case):
    p, needle = _write(tmp_path, case)
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 4, "num_attention_heads": 1,
         "intermediate_size": 8, "vocab_size": 4}))
    code, err = run_cli(["plan", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line(err, str(p), needle)
