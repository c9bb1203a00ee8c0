"""`quantkit imatrix`: the importance matrix from quantkit's torch forward equals the one
llama.cpp's own graph yields on the same token ids (collected through llama-cpp-python's eval
callback exactly as llama-imatrix collects it: helpers.llama_imatrix), on tiny llama and
Gemma-3 models; the CLI writes both formats; the result drives quantize --imatrix to
llama.cpp's bytes."""

import numpy as np
import pytest

from helpers.cli import assert_one_line, run_cli
from helpers.ggml_reference import llama_quantize
from helpers.llama_imatrix import llama_imatrix
from helpers.tiny_models import build_hf_model
from quantkit import api
from quantkit.models.gguf import GGUFSource
from quantkit.models.imatrix_file import read_imatrix

# llama.cpp's CPU kernels (fp16 GELU table, its exp and softmax) round differently from torch:
# sums agree to a few parts in 10^4 of the tensor's largest column
RTOL = 2e-3


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_gguf(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"imx-{request.param}")
    d = build_hf_model(request.param, root)
    out = str(root / "f32.gguf")
    api.quantize(str(d), out, format="gguf:f32", show_progress=False)
    return out, request.param


@pytest.mark.usefixtures("one_thread")
def test_imatrix_equals_llama_cpp(tiny_gguf, tmp_path):
    path, kind = tiny_gguf
    g = np.random.default_rng(0)
    ids = g.integers(3, 1000, size=(3, 64))
    ids[:, 0] = 1 if kind == "llama" else 2                     # BOS first, as llama-imatrix's chunks
    sums, counts = llama_imatrix(path, ids)
    res = api.imatrix(path, tmp_path / "imatrix.gguf", input_ids=ids, show_progress=False)
    imx = read_imatrix(res.output)
    assert sorted(imx.entries) == sorted(sums) and len(sums) == 14      # 7 weights x 2 blocks
    assert res.tokens == 3 * 64
    for name, ref in sums.items():
        e = imx.entries[name]
        assert e.counts.tolist() == [counts[name]] == [192.0]
        err = np.abs(e.sums[0].astype(np.float64) - ref).max() / ref.max()
        assert err < RTOL, (name, err)
    assert imx.chunk_count == 3 and imx.chunk_size == 64


@pytest.mark.usefixtures("one_thread")
def test_cli_imatrix_then_quantize(tiny_gguf, tmp_path, data_dir, capsys):
    path, kind = tiny_gguf
    if kind != "llama":
        return
    calib = f"{data_dir}/wikitext2-valid-excerpt.txt"
    dat = str(tmp_path / "imatrix.dat")
    code, err = run_cli(["-q", "imatrix", path, "--calib", calib, "--nsamples", "2", "--seqlen", "32", "-o", dat], capsys)
    assert code == 0, err
    leg = read_imatrix(dat)
    assert leg.legacy and len(leg.entries) == 14 and leg.datasets == [calib]
    gg = str(tmp_path / "imatrix.gguf")
    code, err = run_cli(["-q", "imatrix", path, "--calib", calib, "--nsamples", "2", "--seqlen", "32", "-o", gg], capsys)
    assert code == 0, err
    imx = read_imatrix(gg)
    for n in imx.entries:                      # the two formats give llama-quantize the same weights
        np.testing.assert_allclose(leg.weights(n), imx.weights(n), rtol=1e-6)
    # quantize --imatrix with it: llama.cpp's bytes given the same weights
    ours, ref = str(tmp_path / "ours.gguf"), str(tmp_path / "ref.gguf")
    code, err = run_cli(["-q", "quantize", path, "--format", "gguf:q4_0", "--imatrix", gg, "-o", ours], capsys)
    assert code == 0, err
    llama_quantize(path, ref, "q4_0", imatrix={n: imx.weights(n) for n in imx.entries})
    a, b = GGUFSource(ours), GGUFSource(ref)
    try:
        for t in a.tensors():
            assert a.tensor_info(t.name).type == b.tensor_info(t.name).type, t.name
            assert np.array_equal(a.raw(t.name)[0], b.raw(t.name)[0]), t.name
        plain = str(tmp_path / "plain.gguf")            # the weights do change the bytes
        api.quantize(path, plain, format="gguf:q4_0", show_progress=False)
        c = GGUFSource(plain)
        assert not np.array_equal(a.raw("blk.0.ffn_up.weight")[0], c.raw("blk.0.ffn_up.weight")[0])
        c.close()
    finally:
        a.close()
        b.close()
    # too little calibration text, and an unwritable output: one line, nothing written
    capsys.readouterr()                                 # llama.cpp's own log lines
    short = tmp_path / "short.txt"
    short.write_text("a few words\n")
    code, err = run_cli(["imatrix", path, "--calib", str(short), "-o", str(tmp_path / "x.gguf")], capsys)
    assert code != 0
    assert_one_line(err, "short.txt", "too short")
    code, err = run_cli(["imatrix", path, "--nsamples", "0", "-o", str(tmp_path / "x.gguf")], capsys)
    assert code != 0
    assert_one_line(err, "nsamples")
    assert not (tmp_path / "x.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
