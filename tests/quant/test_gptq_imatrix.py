"""An importance matrix as a by-product of a GGUF GPTQ run (quantize(..., save_imatrix=),
`quantize --save-imatrix`): llama.cpp's imatrix file of the inputs GPTQ calibrated on. Block 0
equals `imatrix()` on the same calibration tokens (all of it without true-sequential; its q/k/v
inputs with it); later blocks see the already-quantized model. Also: GPTQ writes IQ2_XS, a file
type llama.cpp refuses without an importance matrix (the Hessians take its place), and the
saved matrix then lets round-to-nearest write the same file type."""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers.cli import assert_one_line, no_partial, run_cli
from quantkit import api
from quantkit.models.gguf import GGUFSource
from quantkit.models.imatrix_file import read_imatrix
from quantkit.util.errors import QuantkitError

pytestmark = pytest.mark.usefixtures("one_thread")

CAL = dict(nsamples=4, seqlen=64)
QKV = ("attn_q", "attn_k", "attn_v")


@pytest.fixture(scope="module")
def reference(gptq_llama_dir, tmp_path_factory):
    """quantkit imatrix on the same tokens."""
    out = tmp_path_factory.mktemp("imx-ref") / "ref.gguf"
    api.imatrix(str(gptq_llama_dir), out, show_progress=False, **CAL)
    return read_imatrix(out)


def _block(imx, i: int) -> dict:
    return {n: e for n, e in imx.entries.items() if n.startswith(f"blk.{i}.")}


def test_first_block_equals_imatrix_without_true_sequential(gptq_llama_dir, reference, tmp_path):
    out, imx_path = tmp_path / "m.gguf", tmp_path / "gptq-imatrix.gguf"
    api.quantize(str(gptq_llama_dir), out, format="gguf:iq2_xs", method="gptq", true_sequential=False,
                 save_imatrix=imx_path, show_progress=False, **CAL)
    got = read_imatrix(imx_path)
    assert not got.legacy and got.chunk_count == CAL["nsamples"] and got.chunk_size == CAL["seqlen"]
    assert sorted(got.entries) == sorted(reference.entries)
    b0 = _block(got, 0)
    assert len(b0) == 7
    for name, e in b0.items():
        ref = reference.entries[name]
        assert np.array_equal(e.counts, ref.counts), name
        np.testing.assert_allclose(e.sums, ref.sums, rtol=1e-5, err_msg=name)
    # block 1 follows block 0's quantized outputs: same counts, other sums
    b1 = _block(got, 1)
    assert all(np.array_equal(e.counts, reference.entries[n].counts) for n, e in b1.items())
    assert max(float(np.abs(e.sums / reference.entries[n].sums - 1).max()) for n, e in b1.items()) > 1e-3
    # GPTQ wrote IQ2_XS without an importance matrix; RTN needs one: the saved one serves
    with GGUFSource(out) as g:
        assert sum(t.type == "iq2_xs" for t in g.tensors()) > 0
    rtn = tmp_path / "rtn.gguf"
    api.quantize(str(gptq_llama_dir), rtn, format="gguf:iq2_xs", imatrix=imx_path, show_progress=False)
    with GGUFSource(rtn) as a, GGUFSource(out) as b:
        assert [(t.name, t.type) for t in a.tensors()] == [(t.name, t.type) for t in b.tensors()]


def test_true_sequential_first_block_qkv_and_cli(gptq_llama_dir, reference, tmp_path, capsys):
    out, imx_path = tmp_path / "m.gguf", tmp_path / "gptq-imatrix.dat"
    code, err = run_cli(["quantize", str(gptq_llama_dir), "-o", str(out), "--format", "gguf:q4_k_m", "--method",
                         "gptq", "--nsamples", "4", "--seqlen", "64", "--save-imatrix", str(imx_path)], capsys)
    assert code == 0, err
    got = read_imatrix(imx_path)
    assert got.legacy                                    # a .dat name: llama-imatrix's legacy format
    for name, e in _block(got, 0).items():
        ref = reference.entries[name]
        w, wr = got.weights(name), reference.weights(name)
        if name.split(".")[2] in QKV:                    # the block's float inputs
            np.testing.assert_allclose(w, wr, rtol=1e-5, err_msg=name)
        else:                                            # after block 0's quantized q/k/v (o) or MLP
            assert not np.allclose(w, wr, rtol=1e-3), name
        assert int(e.counts[0]) == CAL["nsamples"]       # legacy counts: chunks


def test_bad_input(gptq_llama_dir, tmp_path, capsys):
    imx = tmp_path / "x.gguf"
    for extra, needle in [(["--format", "gguf:q4_0"], "--save-imatrix collects"),
                          (["--method", "gptq", "--target-bpw", "4.5"], "not a budget")]:
        code, err = run_cli(["quantize", str(gptq_llama_dir), "-o", str(tmp_path / "m.gguf"), *extra,
                             "--save-imatrix", str(imx)], capsys)
        assert code != 0
        assert_one_line(err, needle)
    with pytest.raises(QuantkitError, match="same file"):
        api.quantize(str(gptq_llama_dir), tmp_path / "m.gguf", format="gguf:q4_0", method="gptq",
                     save_imatrix=tmp_path / "m.gguf", show_progress=False, **CAL)
    assert no_partial(tmp_path)
    assert not os.path.exists(imx)
