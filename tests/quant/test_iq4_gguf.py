"""IQ4_XS and IQ4_NL GGUFs of a tiny llama (rows of 256 and 512) through quantkit's GGUF writer,
every quantizable tensor of one type (llama-quantize --pure): the tensors are byte for byte
llama-quantize's, the file loads and generates in llama.cpp, and GPTQ onto the IQ4 grid (the
same file layout) brings llama.cpp's logits closer to the F32 model's than round-to-nearest on
text no calibration saw.

The export goes through the writer's explicit per-tensor plan (quant.gguf_export.export_gguf
with `plan=`) and GPTQ through the GGUF sink (quant.gguf_gptq.GGUFSink); the file types
themselves (`--format gguf:iq4_xs`) are the file-type table's (quant.gguf_policy).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from quantkit import api
from quantkit.models.gguf import GGUFSource
from quantkit.models.open import open_model
from quantkit.quant.driver import quantize_blocks
from quantkit.quant.gguf_export import export_gguf, plan_gguf
from quantkit.quant.gguf_gptq import GGUFSink
from quantkit.quant.gptq import GPTQConfig
from quantkit.runtimes.llama_cpp import LlamaCpp
from helpers.llama_logits import chunk_logits, kld

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The history of the city"


def _llama_quantize_pure(inp: Path, out: Path, ftype: str) -> None:
    """llama.cpp's llama_model_quantize with --pure at the file type MOSTLY_<ftype>."""
    import llama_cpp
    from gguf import LlamaFileType

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LlamaFileType[f"MOSTLY_{ftype.upper()}"])
    params.allow_requantize = True
    params.pure = True
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params)) == 0


def _plan(src, qt: str) -> list:
    """llama-quantize --pure's plan at `qt`: every quantizable tensor of type qt (q8_0's pure
    plan with its type swapped: the same tensors, order and rules)."""
    _, plan = plan_gguf(src, "q8_0", pure=True)
    return [(n, shape, qt if t == "q8_0" else t) for n, shape, t in plan]


@pytest.fixture(scope="module")
def texts(data_dir):
    wt = Path(data_dir) / "wikitext-2"
    return str(wt / "valid.txt"), (wt / "test.txt").read_text(encoding="utf-8")[:20000]


@pytest.fixture(scope="module")
def f32(gptq_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("iq4-f32") / "f32.gguf"
    api.quantize(str(gptq_llama_dir), out, format="gguf:f32", show_progress=False)
    return out


def _export(src_path: Path, out: Path, qt: str) -> dict:
    src = open_model(str(src_path))
    try:
        return export_gguf(src, out, "q8_0", plan=_plan(src, qt), show_progress=False).types
    finally:
        src.close()


@pytest.mark.parametrize("qt", ["iq4_xs", "iq4_nl"])
def test_rtn_file_equals_llama_quantize_and_generates(f32, tmp_path, qt):
    ours, ref = tmp_path / f"ours-{qt}.gguf", tmp_path / f"llama-{qt}.gguf"
    types = _export(f32, ours, qt)
    _llama_quantize_pure(f32, ref, qt)
    assert types["blk.0.ffn_down.weight"] == types["token_embd.weight"] == types["output.weight"] == qt
    with GGUFSource(ours) as a, GGUFSource(ref) as b:
        assert [(t.name, t.type, t.shape) for t in a.tensors()] == [(t.name, t.type, t.shape) for t in b.tensors()]
        bad = [t.name for t in a.tensors() if not np.array_equal(np.asarray(a.raw(t.name)[0]), np.asarray(b.raw(t.name)[0]))]
        assert bad == []
        assert sum(t.type == qt for t in a.tensors()) == 2 + 7 * 2
    outs = []
    for path in (ours, ref):
        rt = LlamaCpp(str(path), n_ctx=128, n_threads=2)
        outs.append(rt.generate(PROMPT, max_tokens=12))
        rt.close()
    assert len(outs[0].tokens) >= 4 and outs[0].text.strip()
    assert outs[0].tokens == outs[1].tokens


# KL divergence to the F32 model on held-out wikitext-2 test (3 chunks of 256), RTN / GPTQ with
# 8 x 128 calibration tokens of wikitext-2 valid (GPTQConfig() defaults), measured: iq4_xs
# 0.357 / 0.195 (1.83x). A random model with exaggerated norm gains, as in test_gguf_gptq.py.
FACTOR = 1.6


def test_gptq_onto_iq4_xs_runs_in_llama_cpp_and_beats_rtn(gptq_llama_dir, f32, texts, tmp_path):
    calib, held_out = texts
    rtn, gptq = tmp_path / "rtn.gguf", tmp_path / "gptq.gguf"
    _export(gptq_llama_dir, rtn, "iq4_xs")
    src = open_model(str(gptq_llama_dir))
    try:
        sink = GGUFSink(src, str(gptq), "q8_0", _plan(src, "iq4_xs"), GPTQConfig(), True, False)
        try:
            quantize_blocks(src, src.path, sink, calib=calib, nsamples=8, seqlen=128, show_progress=False)
        finally:
            sink.close()
    finally:
        src.close()
    assert sink.n_gptq == 14                                  # every decoder linear of both blocks
    with GGUFSource(gptq) as a, GGUFSource(rtn) as b:
        assert [(t.name, t.type, t.shape) for t in a.tensors()] == [(t.name, t.type, t.shape) for t in b.tensors()]
        for t in a.tensors():
            same = np.array_equal(np.asarray(a.raw(t.name)[0]), np.asarray(b.raw(t.name)[0]))
            assert same == (not t.name.startswith("blk.") or "norm" in t.name), t.name
    ref = chunk_logits(f32, held_out)
    k_rtn, k_gptq = kld(ref, chunk_logits(rtn, held_out)), kld(ref, chunk_logits(gptq, held_out))
    assert k_gptq * FACTOR < k_rtn, (k_gptq, k_rtn)
