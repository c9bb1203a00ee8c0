"""llama.cpp's importance-matrix files: GGUF and legacy .dat, both ways, read by gguf-py as an
independent check of the GGUF layout; truncated and corrupt files and imatrices of other models
refused in one line."""

import os
import struct

import numpy as np
import pytest
from gguf import GGUFReader

from quantkit.models.imatrix_file import (Imatrix, ImatrixEntry, from_legacy, read_imatrix, save_imatrix,
                                          write_imatrix, write_imatrix_dat)
from quantkit.util.errors import QuantkitError


def _imatrix() -> Imatrix:
    g = np.random.default_rng(0)
    e = {
        "blk.0.attn_q.weight": ImatrixEntry(g.random((1, 64), dtype=np.float32) * 100, np.array([1024.0])),
        "blk.0.ffn_down.weight": ImatrixEntry(g.random((1, 96), dtype=np.float32) * 3, np.array([1024.0])),
        # a MoE tensor of 4 experts, one never routed to
        "blk.1.ffn_up_exps.weight": ImatrixEntry(g.random((4, 32), dtype=np.float32), np.array([300.0, 0, 12, 712])),
    }
    e["blk.1.ffn_up_exps.weight"].sums[1] = 0
    return Imatrix(e, ["wiki.valid.raw"], chunk_count=2, chunk_size=512)


def test_gguf_round_trip_and_layout(tmp_path):
    imx = _imatrix()
    p = tmp_path / "imatrix.gguf"
    write_imatrix(imx, p)
    back = read_imatrix(p)
    assert not back.legacy and back.datasets == ["wiki.valid.raw"]
    assert (back.chunk_count, back.chunk_size) == (2, 512)
    assert sorted(back.entries) == sorted(imx.entries)
    for n, e in imx.entries.items():
        assert np.array_equal(back.entries[n].sums, e.sums)
        assert np.array_equal(back.entries[n].counts, e.counts)
    # gguf-py reads the same file: llama-imatrix's names, types, shapes and keys
    r = GGUFReader(str(p))
    names = [t.name for t in r.tensors]
    assert names == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                     "blk.0.ffn_down.weight.in_sum2", "blk.0.ffn_down.weight.counts",
                     "blk.1.ffn_up_exps.weight.in_sum2", "blk.1.ffn_up_exps.weight.counts"]
    t = {t.name: t for t in r.tensors}
    assert list(t["blk.1.ffn_up_exps.weight.in_sum2"].shape) == [32, 4]
    assert list(t["blk.0.attn_q.weight.in_sum2"].shape) == [64]
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_size"].contents() == 512
    assert r.fields["imatrix.datasets"].contents() == ["wiki.valid.raw"]
    # llama-quantize's weights: sum / count per expert, 1 for an expert with no token
    w = back.weights("blk.1.ffn_up_exps.weight").reshape(4, 32)
    e = imx.entries["blk.1.ffn_up_exps.weight"]
    assert np.array_equal(w[0], (e.sums[0] / np.float32(300)).astype(np.float32))
    assert np.all(w[1] == 1.0)
    assert back.weights("output.weight") is None


def test_dat_round_trip_both_ways(tmp_path):
    imx = _imatrix()
    dat = tmp_path / "imatrix.dat"
    write_imatrix_dat(imx, dat)
    leg = read_imatrix(dat)
    assert leg.legacy and leg.datasets == ["wiki.valid.raw"] and leg.chunk_count == 2
    # save_imatrix_legacy: ncall = ceil(max count / chunk size), values (sum / count) * ncall
    e = imx.entries["blk.0.attn_q.weight"]
    assert leg.entries["blk.0.attn_q.weight"].counts[0] == 2
    stored = leg.entries["blk.0.attn_q.weight"].sums[0]
    assert np.array_equal(stored, ((e.sums[0] / np.float32(1024)) * np.float32(2)).astype(np.float32))
    # llama-quantize's weights agree between the two formats (to rounding)
    for n in imx.entries:
        if n != "blk.1.ffn_up_exps.weight":
            np.testing.assert_allclose(leg.weights(n), imx.weights(n), rtol=1e-6)
    # legacy -> raw sums and counts (llama-imatrix's load) -> GGUF -> .dat gives the same bytes
    g2 = tmp_path / "back.gguf"
    write_imatrix(from_legacy(leg, 512), g2)
    dat2 = tmp_path / "back.dat"
    write_imatrix_dat(read_imatrix(g2), dat2)
    assert dat.read_bytes() == dat2.read_bytes()
    # exact layout of the first entry: int32 count, int32 len, name, int32 ncall, int32 nval, floats
    raw = dat.read_bytes()
    n_entries, ln = struct.unpack_from("<ii", raw, 0)
    assert n_entries == 3 and raw[8:8 + ln] == b"blk.0.attn_q.weight"
    save_imatrix(imx, tmp_path / "x.dat")
    assert read_imatrix(tmp_path / "x.dat").legacy


def _one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_truncated_files_refused(tmp_path, fmt):
    p = tmp_path / f"imatrix.{fmt}"
    (write_imatrix if fmt == "gguf" else write_imatrix_dat)(_imatrix(), p)
    raw = p.read_bytes()
    cuts = sorted(set(list(range(0, 40)) + list(range(40, len(raw) - 1, max(1, len(raw) // 97)))))
    cut_file = tmp_path / f"cut.{fmt}"
    for k in cuts:
        cut_file.write_bytes(raw[:k])
        if fmt == "dat" and k >= len(raw) - 14 - 4:
            continue        # within the optional trailer: legal cuts at its field boundaries
        with pytest.raises(QuantkitError) as ei:
            read_imatrix(cut_file)
        _one_line(ei, str(cut_file))


def test_corrupt_files_refused(tmp_path):
    p = tmp_path / "imatrix.gguf"
    imx = _imatrix()
    imx.entries["blk.0.attn_q.weight"].sums[0, 3] = np.nan
    write_imatrix(imx, p)
    with pytest.raises(QuantkitError) as ei:
        read_imatrix(p)
    _one_line(ei, "blk.0.attn_q.weight", "NaN")
    # a counts tensor missing: the .counts name changed
    write_imatrix(_imatrix(), p)
    raw = bytearray(p.read_bytes())
    i = raw.find(b"blk.0.ffn_down.weight.counts")
    raw[i + len("blk.0.ffn_down.weight."):i + len("blk.0.ffn_down.weight.counts")] = b"xounts"
    p.write_bytes(bytes(raw))
    with pytest.raises(QuantkitError) as ei:
        read_imatrix(p)
    _one_line(ei, "blk.0.ffn_down.weight", ".counts")
    # not an imatrix at all
    q = tmp_path / "text.dat"
    q.write_bytes(b"hello world, this is not an imatrix")
    with pytest.raises(QuantkitError) as ei:
        read_imatrix(q)
    _one_line(ei, "quantkit imatrix")
    with pytest.raises(QuantkitError) as ei:
        read_imatrix(tmp_path / "missing.gguf")
    _one_line(ei, "no such")
    # a dat with trailing garbage
    d = tmp_path / "g.dat"
    write_imatrix_dat(_imatrix(), d)
    d.write_bytes(d.read_bytes() + b"xyz")
    with pytest.raises(QuantkitError) as ei:
        read_imatrix(d)
    _one_line(ei, "unexpected bytes")


def test_imatrix_for_another_model_refused(tmp_path):
    imx = _imatrix()
    shapes = {"blk.0.attn_q.weight": (64, 64), "blk.0.ffn_down.weight": (64, 96),
              "blk.1.ffn_up_exps.weight": (4, 64, 32)}
    imx.check_model(shapes)
    with pytest.raises(QuantkitError) as ei:
        imx.check_model({**shapes, "blk.0.ffn_down.weight": (64, 128)})
    _one_line(ei, "blk.0.ffn_down.weight", "96", "128", "another model")
    del shapes["blk.0.attn_q.weight"]
    with pytest.raises(QuantkitError) as ei:
        imx.check_model(shapes, "model.gguf")
    _one_line(ei, "blk.0.attn_q.weight", "names no tensor")


def test_nothing_partial_left(tmp_path):
    write_imatrix(_imatrix(), tmp_path / "a.gguf")
    write_imatrix_dat(_imatrix(), tmp_path / "a.dat")
    assert sorted(os.listdir(tmp_path)) == ["a.dat", "a.gguf"]
