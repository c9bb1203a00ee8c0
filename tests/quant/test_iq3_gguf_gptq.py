"""A tiny llama GGUF with every quantizable tensor IQ3_S (llama-quantize --pure's plan), the
decoder linears solved by GPTQ onto the IQ3_S lattice through the GGUF sink: the file has the
round-to-nearest file's tensors, types and shapes, loads and generates in llama.cpp, and brings
llama.cpp's logits closer to the F32 model's than round-to-nearest on text no calibration saw."""

from __future__ import annotations

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

QT = "iq3_s"


def _plan(src, qt: str) -> list:
    """llama-quantize --pure's plan with every quantizable tensor of type qt."""
    _, plan = plan_gguf(src, "q8_0", pure=True)
    return [(n, shape, qt if t == "q8_0" else t) for n, shape, t in plan]


# KL divergence to the F32 model on held-out wikitext-2 test (3 chunks of 256), RTN / GPTQ with
# 8 x 128 calibration tokens of wikitext-2 valid (GPTQConfig() defaults), measured: 1.057 / 0.621
# (1.70x). A random model with exaggerated norm gains, as in test_gguf_gptq.py.
FACTOR = 1.4


def test_gptq_onto_iq3_s_runs_in_llama_cpp_and_beats_rtn(gptq_llama_dir, data_dir, tmp_path):
    wt = Path(data_dir) / "wikitext-2"
    calib, held_out = str(wt / "valid.txt"), (wt / "test.txt").read_text(encoding="utf-8")[:20000]
    f32, rtn, gptq = tmp_path / "f32.gguf", tmp_path / "rtn.gguf", tmp_path / "gptq.gguf"
    api.quantize(str(gptq_llama_dir), f32, format="gguf:f32", show_progress=False)
    src = open_model(str(gptq_llama_dir))
    try:
        export_gguf(src, rtn, "q8_0", plan=_plan(src, QT), show_progress=False)
        sink = GGUFSink(src, str(gptq), "q8_0", _plan(src, QT), GPTQConfig(), True, False)
        try:
            quantize_blocks(src, src.path, sink, calib=calib, nsamples=8, seqlen=128, show_progress=False)
        finally:
            sink.close()
    finally:
        src.close()
    assert sink.n_gptq == 14                                  # every decoder linear of both blocks
    with GGUFSource(gptq) as a, GGUFSource(rtn) as b:
        assert [(t.name, t.type, t.shape) for t in a.tensors()] == [(t.name, t.type, t.shape) for t in b.tensors()]
        assert sum(t.type == QT for t in a.tensors()) == 2 + 7 * 2
        for t in a.tensors():
            same = np.array_equal(np.asarray(a.raw(t.name)[0]), np.asarray(b.raw(t.name)[0]))
            assert same == (not t.name.startswith("blk.") or "norm" in t.name), t.name
    rt = LlamaCpp(str(gptq), n_ctx=128, n_threads=2)
    try:
        out = rt.generate("The history of the city", max_tokens=12)
    finally:
        rt.close()
    assert len(out.tokens) >= 4 and out.text.strip()
    ref = chunk_logits(f32, held_out)
    k_rtn, k_gptq = kld(ref, chunk_logits(rtn, held_out)), kld(ref, chunk_logits(gptq, held_out))
    assert k_gptq * FACTOR < k_rtn, (k_gptq, k_rtn)
