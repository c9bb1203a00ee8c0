"""The strict GGUF reader: every rule of llama.cpp's loader (ggml/src/gguf.cpp) broken once, in a
file built byte by byte, ends in GGUFFormatError naming the problem; through the CLI (plan,
inspect) in one line naming the file. Hyper-parameters: wrong types, zeros, inconsistencies
with the tensors, a duplicated tensor name, each refused with the key named."""

import struct

import pytest
from gguf import GGUFValueType

from helpers.cli import assert_one_line, run_cli
from helpers.fuzz import tiny_gguf_parts, write_model
from quantkit.models.gguf import GGUFSource
from quantkit.models.gguf_file import GGUFFile, GGUFFormatError
from quantkit.models.source import MetaValue
from quantkit.util.errors import QuantkitError

U32, U64, STR, ARR = 4, 10, 8, 9


def s(x) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def gguf_bytes(kvs=None, tensors=None, data=256, version=3, n_kv=None, n_tensors=None, align=32) -> bytes:
    """kvs: (key, value type, payload bytes); tensors: (name, dims in ggml order, type id, offset)."""
    kvs = [("general.architecture", STR, s("x"))] if kvs is None else kvs
    tensors = [("a", (32,), 0, 0), ("b", (32,), 0, 128)] if tensors is None else tensors
    out = b"GGUF" + struct.pack("<I", version)
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    for key, vt, payload in kvs:
        out += s(key) + struct.pack("<I", vt) + payload
    for name, dims, tt, off in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", tt, off)
    out += b"\0" * ((-len(out)) % align)
    return out + b"\0" * data


BAD = {
    "unknown ggml type": (dict(tensors=[("a", (32,), 99, 0)]), "unknown ggml type 99"),
    "removed ggml type": (dict(tensors=[("a", (32,), 4, 0)]), "unknown ggml type 4"),
    "unknown value type": (dict(kvs=[("k", 13, b"")]), "unknown value type 13"),
    "nested array": (dict(kvs=[("k", ARR, struct.pack("<IQ", ARR, 1))]), "invalid element type"),
    "key length near 2^63": (dict(kvs=[("k", STR, struct.pack("<Q", (1 << 63) - 5))]), "claims"),
    "string length past the file": (dict(kvs=[("k", STR, struct.pack("<Q", 10_000))]), "claims"),
    "array count near 2^62": (dict(kvs=[("k", ARR, struct.pack("<IQ", U32, 1 << 62))]), "elements"),
    "string array past the file": (dict(kvs=[("k", ARR, struct.pack("<IQ", STR, 1 << 20))]), "past the end"),
    "alignment 0": (dict(kvs=[("general.alignment", U32, struct.pack("<I", 0))]), "not a power of two"),
    "alignment 48": (dict(kvs=[("general.alignment", U32, struct.pack("<I", 48))]), "not a power of two"),
    "alignment of type u64": (dict(kvs=[("general.alignment", U64, struct.pack("<Q", 32))]), "must be uint32"),
    "dimension 0": (dict(tensors=[("a", (32, 0), 0, 0)]), "dimension 0"),
    "negative dimension": (dict(tensors=[("a", (32, (1 << 64) - 1), 0, 0)]), "dimension -1"),
    "five dimensions": (dict(tensors=[("a", (32, 1, 1, 1, 1), 0, 0)]), "5 dimensions"),
    "element count overflow": (dict(tensors=[("a", (1 << 40, 1 << 40), 0, 0)]), "more than 2^63"),
    "misaligned offset": (dict(tensors=[("a", (32,), 0, 0), ("b", (32,), 0, 130)]), "expected 128"),
    "overlapping tensors": (dict(tensors=[("a", (32,), 0, 0), ("b", (32,), 0, 0)]), "expected 128"),
    "out of order": (dict(tensors=[("a", (32,), 0, 128), ("b", (32,), 0, 0)]), "expected 0"),
    "duplicate tensor name": (dict(tensors=[("a", (32,), 0, 0), ("a", (32,), 0, 128)]), "appears twice"),
    "duplicate key": (dict(kvs=[("k", U32, b"\0" * 4), ("k", U32, b"\0" * 4)]), "appears twice"),
    "empty key": (dict(kvs=[("", U32, b"\0" * 4)]), "empty"),
    "data past the end": (dict(data=200), "runs past the end"),
    "row not a multiple of the block": (dict(tensors=[("a", (33,), 2, 0)]), "not a multiple of its block size 32"),
    "tensor name of 64 bytes": (dict(tensors=[("n" * 64, (32,), 0, 0)]), "longer than 63"),
    "key count past the file": (dict(n_kv=(1 << 63) - 1), "does not fit"),
    "negative tensor count": (dict(n_tensors=(1 << 64) - 1), "does not fit"),
    "version 1": (dict(version=1), "unsupported GGUF version 1"),
    "big-endian version": (dict(version=3 << 24), "unsupported GGUF version"),
}


def test_the_base_file_is_valid(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(gguf_bytes())
    f = GGUFFile(p)
    assert [(t.name, t.offset - f.data_start, t.nbytes) for t in f.tensors] == [("a", 0, 128), ("b", 128, 128)]
    f.close()


@pytest.mark.parametrize("case", sorted(BAD))
def test_container_rule_broken_is_refused(tmp_path, case):
    kw, needle = BAD[case]
    p = tmp_path / "bad.gguf"
    p.write_bytes(gguf_bytes(**kw))
    with pytest.raises(GGUFFormatError, match=needle.replace("^", r"\^")) as e:
        GGUFFile(p)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


@pytest.mark.parametrize("case", ["key length near 2^63", "alignment 0", "misaligned offset", "duplicate tensor name",
                                  "unknown ggml type", "dimension 0"])
@pytest.mark.parametrize("command", ["plan", "inspect"])
def test_cli_prints_one_line_naming_the_file(tmp_path, capsys, case, command):
    kw, needle = BAD[case]
    p = tmp_path / "bad.gguf"
    p.write_bytes(gguf_bytes(**kw))
    code, err = run_cli([command, str(p)], capsys)
    assert code == 2
    assert_one_line(err, str(p), needle)


@pytest.fixture(scope="module")
def parts(bundled_gguf):
    return tiny_gguf_parts(bundled_gguf)


def _model(tmp_path, parts, set_meta=None, drop=(), tensors=None):
    meta, tlist = parts
    meta = {k: v for k, v in meta.items() if k not in drop}
    meta.update(set_meta or {})
    return write_model(str(tmp_path / "m.gguf"), meta, tensors or tlist)


def test_the_tiny_model_is_valid(tmp_path, parts):
    src = GGUFSource(_model(tmp_path, parts))
    assert (src.spec.n_layer, src.spec.n_head, src.spec.n_head_kv, src.spec.n_vocab) == (2, 4, 1, 512)
    src.close()


HPARAMS = {
    "zero heads": ({"gemma3.attention.head_count": MetaValue(0, GGUFValueType.UINT32)}, (), "gemma3.attention.head_count"),
    "block_count a string": ({"gemma3.block_count": MetaValue("two", GGUFValueType.STRING)}, (),
                             "gemma3.block_count: is of type string ('two'), expected uint32"),
    "block_count zero": ({"gemma3.block_count": MetaValue(0, GGUFValueType.UINT32)}, (), "gemma3.block_count: = 0"),
    "block_count int32": ({"gemma3.block_count": MetaValue(2, GGUFValueType.INT32)}, (), "expected uint32"),
    "kv heads not dividing": ({"gemma3.attention.head_count_kv": MetaValue(3, GGUFValueType.UINT32)}, (),
                              "does not divide head_count 4"),
    "embedding width wrong": ({"gemma3.embedding_length": MetaValue(96, GGUFValueType.UINT32)}, (), "token_embd.weight"),
    "context length missing": ({}, ("gemma3.context_length",), "gemma3.context_length: is missing"),
    "rope base NaN": ({"gemma3.rope.freq_base": MetaValue(float("nan"), GGUFValueType.FLOAT32)}, (),
                      "not a positive finite"),
    "no tokenizer": ({}, ("tokenizer.ggml.model",), "tokenizer.ggml.model: is missing"),
    "unknown tokenizer": ({"tokenizer.ggml.model": MetaValue("lama", GGUFValueType.STRING)}, (), "not a tokenizer"),
    "add_bos as u8": ({"tokenizer.ggml.add_bos_token": MetaValue(1, GGUFValueType.UINT8)}, (), "expected bool"),
    "scores too short": ({"tokenizer.ggml.scores": MetaValue([0.0] * 10, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)},
                         (), "has 10 entries for 512 tokens"),
    "no norm epsilon": ({}, ("gemma3.attention.layer_norm_rms_epsilon",), "layer_norm_rms_epsilon: is missing"),
}


@pytest.mark.parametrize("case", sorted(HPARAMS))
def test_bad_hyper_parameter_names_the_key(tmp_path, capsys, parts, case):
    set_meta, drop, needle = HPARAMS[case]
    path = _model(tmp_path, parts, set_meta, drop)
    with pytest.raises(QuantkitError, match=None) as e:
        GGUFSource(path)
    assert needle in str(e.value) and path in str(e.value)
    for command in ("plan", "inspect"):
        code, err = run_cli([command, path], capsys)
        assert code == 2
        assert_one_line(err, path, needle)


def test_block_index_past_block_count(tmp_path, parts):
    meta, tlist = parts
    path = _model(tmp_path, parts, tensors=tlist + [("blk.7.attn_norm.weight", (64,), "f32")])
    with pytest.raises(QuantkitError, match="blk.7.attn_norm.weight.*block_count = 2"):
        GGUFSource(path)


def test_duplicated_tensor_name_never_makes_another_model(tmp_path, parts, capsys):
    """An untied head renamed to token_embd.weight: quantkit once read the second record as the
    embedding and wrote a tied model; now the file is refused, as llama.cpp refuses it."""
    meta, tlist = parts
    path = _model(tmp_path, parts, tensors=tlist + [("outpt_embd.weight", (512, 64), "q8_0")])
    raw = open(path, "rb").read()
    assert raw.count(b"outpt_embd.weight") == 1
    with open(path, "wb") as f:
        f.write(raw.replace(b"outpt_embd.weight", b"token_embd.weight"))
    with pytest.raises(QuantkitError, match="'token_embd.weight' appears twice"):
        GGUFSource(path)
    code, err = run_cli(["quantize", path, "--format", "gguf:q8_0", "-o", str(tmp_path / "o.gguf")], capsys)
    assert code == 2 and not (tmp_path / "o.gguf").exists()
    assert_one_line(err, path, "appears twice")


def test_a_vocabulary_with_a_token_twice_is_never_written(tmp_path, parts):
    """llama.cpp aborts (an assert) on such a vocabulary; reading stays fast, writing refuses."""
    meta, tlist = parts
    toks = list(meta["tokenizer.ggml.tokens"].value)
    toks[300] = toks[301]
    bad = {**meta, "tokenizer.ggml.tokens": MetaValue(toks, GGUFValueType.ARRAY, GGUFValueType.STRING)}
    out = tmp_path / "o.gguf"
    with pytest.raises(QuantkitError, match="twice; llama.cpp cannot load"):
        write_model(str(out), bad, tlist)
    assert not out.exists() and list(tmp_path.iterdir()) == []
