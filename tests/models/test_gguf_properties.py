"""Property tests (hypothesis, derandomized) of the GGUF writer and the strict reader: random
metadata and tensors written by models.gguf.write_gguf_file read back identically by
models.gguf_file.GGUFFile and by gguf-py's own GGUFReader; every truncation is refused."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.codecs.registry import qtype
from quantkit.models.gguf import write_gguf_file
from quantkit.models.gguf_file import GGUFFile, GGUFFormatError
from quantkit.models.source import MetaValue

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
V = GGUFValueType
INT_RANGES = {V.UINT8: (0, 255), V.INT8: (-128, 127), V.UINT16: (0, 65535), V.INT16: (-32768, 32767),
              V.UINT32: (0, 2**32 - 1), V.INT32: (-2**31, 2**31 - 1), V.UINT64: (0, 2**64 - 1),
              V.INT64: (-2**63, 2**63 - 1)}
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
f32 = st.floats(width=32, allow_nan=False)
f64 = st.floats(allow_nan=False)


@st.composite
def meta_value(draw):
    vt = draw(st.sampled_from([*INT_RANGES, V.FLOAT32, V.FLOAT64, V.BOOL, V.STRING, V.ARRAY]))
    if vt in INT_RANGES:
        return MetaValue(draw(st.integers(*INT_RANGES[vt])), vt)
    if vt == V.FLOAT32:
        return MetaValue(draw(f32), vt)
    if vt == V.FLOAT64:
        return MetaValue(draw(f64), vt)
    if vt == V.BOOL:
        return MetaValue(draw(st.booleans()), vt)
    if vt == V.STRING:
        return MetaValue(draw(text), vt)
    sub = draw(st.sampled_from([V.UINT32, V.INT64, V.FLOAT32, V.STRING, V.BOOL]))
    elems = {V.UINT32: st.integers(*INT_RANGES[V.UINT32]), V.INT64: st.integers(*INT_RANGES[V.INT64]),
             V.FLOAT32: f32, V.STRING: text, V.BOOL: st.booleans()}[sub]
    # long enough, sometimes, for the writer's bulk path and the reader's lazy arrays
    n = draw(st.sampled_from([1, 3, 70, 5000]))
    first = draw(st.lists(elems, min_size=1, max_size=3))
    return MetaValue((first * n)[:n], vt, sub)


TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q6_k"]


@st.composite
def tensor_list(draw):
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_.]{0,30}", fullmatch=True), min_size=0, max_size=5,
                          unique=True))
    out = []
    for name in names:
        t = qtype(draw(st.sampled_from(TYPES)))
        lead = draw(st.lists(st.integers(1, 3), max_size=2))
        out.append((name, (*lead, t.block_size * draw(st.integers(1, 3))), t.name))
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return np.float64(a) == np.float64(b)
    return list(a) == list(b) if isinstance(b, (list, tuple)) or hasattr(b, "__len__") and not isinstance(b, str) \
        else a == b


@SETTINGS
@given(meta=st.dictionaries(st.from_regex(r"test\.[a-z_]{1,20}", fullmatch=True), meta_value(), max_size=6),
       tensors=tensor_list(), seed=st.integers(0, 2**32 - 1))
def test_write_then_read_gives_back_metadata_and_tensors(tmp_path_factory, meta, tensors, seed):
    path = str(tmp_path_factory.mktemp("prop") / "m.gguf")
    rng = np.random.default_rng(seed)
    data = {n: rng.integers(0, 256, qtype(t).nbytes(s), dtype=np.uint8) for n, s, t in tensors}
    write_gguf_file(path, "test", meta, tensors, lambda n: data[n])
    f = GGUFFile(path)
    try:
        for k, mv in meta.items():
            got = f.fields[k]
            assert got.vtype == mv.vtype and got.sub_type == mv.sub_type
            if mv.sub_type in (V.FLOAT32,):
                assert np.array_equal(np.asarray(got.value, np.float32), np.asarray(mv.value, np.float32))
            elif mv.vtype == V.FLOAT32:
                assert np.float32(got.value) == np.float32(mv.value)
            else:
                assert _same(got.value, mv.value)
        assert [(t.name, t.shape, t.ggml_type.name.lower()) for t in f.tensors] == \
            [(n, tuple(s), t) for n, s, t in tensors]
        for t in f.tensors:
            assert np.array_equal(f.data(t), data[t.name])
    finally:
        f.close()
    ref = GGUFReader(path)             # gguf-py's reader agrees on names, types and bytes
    assert [(t.name, t.tensor_type) for t in ref.tensors] == \
        [(n, GGMLQuantizationType[t.upper()]) for n, _, t in tensors]
    for t in ref.tensors:
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), data[t.name])


@settings(max_examples=10, deadline=None, derandomize=True)
@given(tensors=tensor_list().filter(bool), cut=st.floats(0, 1, exclude_max=True))
def test_every_truncation_is_refused(tmp_path_factory, tensors, cut):
    """A file cut anywhere before its last tensor's end is refused with GGUFFormatError."""
    d = tmp_path_factory.mktemp("cut")
    path = str(d / "m.gguf")
    write_gguf_file(path, "test", {"test.x": MetaValue("y" * 40, V.STRING)}, tensors,
                    lambda n: np.zeros(qtype(next(t for m, _, t in tensors if m == n)).nbytes(
                        next(s for m, s, _ in tensors if m == n)), np.uint8))
    raw = open(path, "rb").read()
    f = GGUFFile(path)
    end = max(t.offset + t.nbytes for t in f.tensors)
    f.close()
    bad = d / "cut.gguf"
    bad.write_bytes(raw[:int(cut * end)])
    with pytest.raises(GGUFFormatError):
        GGUFFile(str(bad))
