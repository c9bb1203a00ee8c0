"""A quantized checkpoint's codes kept in K-quant blocks (Q4_K, Q5_K, Q6_K, Q3_K;
quant.convert_kquant): decoded by llama.cpp's own to_float, every value within the reported
scale-rounding bound of the checkpoint's, the codes equal to the checkpoint's, and the error far
below the solved path's."""

import os

import numpy as np
import pytest
import torch

from quantkit import api
from quantkit.codecs import kquants
from quantkit.models.arch import permute_for_rope
from quantkit.models.gguf import GGUFSource
from quantkit.models.quantized_source import QuantizedHFSource, SourceGrid
from quantkit.quant.convert import convert_to_gguf
from quantkit.quant.convert_kquant import codes_blocks
from helpers.ggml_reference import ggml_dequantize

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = {"q4_k": kquants.Q4_K, "q5_k": kquants.Q5_K, "q6_k": kquants.Q6_K, "q3_k": kquants.Q3_K}


@pytest.fixture(scope="module")
def ck(gptq_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kq")
    made = {}

    def get(spec):
        if spec not in made:
            made[spec] = root / spec.replace(":", "_")
            api.quantize_gpu(str(gptq_llama_dir), str(made[spec]), recipe=spec + "+rtn", show_progress=False)
        return made[spec]
    return get


def _gguf_order(src, name, t):
    if src.hf_arch.permute_qk and (".attn_q." in name or ".attn_k." in name):
        return permute_for_rope(t, src.spec.n_head if ".attn_q." in name else src.spec.n_head_kv)
    return t


@pytest.mark.parametrize("spec,ft", [("gptq:w4g128", "q4_k_m"), ("gptq:w4g64-asym", "q4_k_m"),
                                     ("gptq:w4g32-asym", "q5_k_m"), ("gptq:w4g128", "q6_k"),
                                     ("gptq:w3g32", "q3_k_s")])
def test_codes_kept_decode_in_llama_cpp_within_the_scale_bound(ck, tmp_path, spec, ft):
    d = ck(spec)
    out = tmp_path / "o.gguf"
    rep = convert_to_gguf(str(d), str(out), ft, show_progress=False)
    lin = {n: t for n, t in rep.tensors.items() if t.path != "float"}
    assert {t.path for t in lin.values()} == {"codes"} and rep.n_gptq == 0
    assert {t.type for t in lin.values()} >= {{"q4_k_m": "q4_k"}.get(ft, ft[:4])}
    # the 6-bit (Q4_K/Q5_K) or int8 (Q6_K) scales: measured worst 0.6% / 0.3% of the scale and
    # 0.06 / 0.03 of a step on the values
    # the 6-bit (Q4_K/Q5_K), int8 (Q6_K) or signed 6-bit (Q3_K) scales rounded: worst relative
    # scale error measured 0.8% (g128), 0.9% (g64), 1.6% (g32: eight scales per super-block),
    # 0.37% (Q6_K), 3.9% (3-bit g32 -> Q3_K: sixteen scales on 1..31); the worst value 0.06 /
    # 0.11 / 0.21 / 0.027 / 0.13 of the checkpoint's step
    assert 0 < rep.max_scale_error < {"q6_k": 0.005, "q3_k_s": 0.06}.get(ft, 0.02)
    assert rep.max_value_error < {"q6_k": 0.04, "q3_k_s": 0.2}.get(ft, 0.25)
    with QuantizedHFSource(str(d)) as src, GGUFSource(str(out)) as g:
        for name, p in lin.items():
            raw, typ = g.raw(name)
            shape = g.tensor_info(name).shape
            grid = src.grid(name)
            raw = np.array(raw)
            dec = torch.from_numpy(ggml_dequantize(typ, raw, shape[-1]))
            want = src.load(name)
            step = _gguf_order(src, name, grid.column_scales())
            diff = ((dec.reshape(want.shape) - want).abs() / step).max().item()
            assert diff <= p.value_error * (1 + 1e-5) + 1e-6, name
            fmt = FORMATS[p.type]
            codes = fmt.unpack(torch.from_numpy(raw).reshape(-1, fmt.layout.type_size)).int()
            q = _gguf_order(src, name, grid.q if fmt.off == 0 else grid.q - grid.column_zeros() + fmt.off)
            assert torch.equal(codes.reshape(q.shape), q.int()), name


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_codes_path_error_far_below_the_solved_path(ck, tmp_path, data_dir):
    """Same checkpoint, same type: the logits' mean squared error to the checkpoint's (run at
    F32) is at least 100x lower with the codes kept than with GPTQ solving onto Q4_K_M's grids
    (measured 880x on the tiny llama: 7.5e-5 against 0.066; embeddings and head kept at F32 so
    that only the linears differ)."""
    import transformers as tf
    from transformers import AutoTokenizer
    from quantkit.quant.calib import calibration_ids
    from quantkit.runtimes.torch import model_from_gguf
    d = ck("gptq:w4g128")
    kept, solved = tmp_path / "kept.gguf", tmp_path / "solved.gguf"
    floats = {"token_embedding_type": "f32", "output_tensor_type": "f32"}     # only the linears differ
    rk = convert_to_gguf(str(d), str(kept), "q4_k_m", show_progress=False, **floats)
    rs = convert_to_gguf(str(d), str(solved), "q4_k_m", keep_codes=False, nsamples=16, seqlen=128,
                         show_progress=False, **floats)
    assert rk.counts()["codes"] == 14 and rs.counts()["gptq"] == 14
    with QuantizedHFSource(str(d)) as src:
        cfg = tf.AutoConfig.from_pretrained(str(d))
        cfg.quantization_config = None
        ref = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
        ref.load_state_dict({n: src.load_hf(n) for n in ref.state_dict() if src.load_hf(n) is not None},
                            strict=False)
    ids = calibration_ids(AutoTokenizer.from_pretrained(str(d)),
                          os.path.join(data_dir, "wikitext-2", "test.txt"), 4, 128)
    want = _logits(ref, ids)
    err = {k: float(((_logits(model_from_gguf(str(p)), ids) - want) ** 2).mean()) for k, p in
           (("kept", kept), ("solved", solved))}
    assert err["kept"] * 100 < err["solved"], err


def _grid(q, s, z, g):
    return SourceGrid(bits=4, group_size=g, sym=False, scales=s, scale_dtype=torch.float16, q=q, zeros=z)


def test_codes_refused_where_they_do_not_fit():
    q = torch.randint(0, 16, (4, 256), dtype=torch.int32)
    s = (torch.rand(4, 16) * 0.01 + 0.001).half().float()
    z = torch.full((4, 16), 8, dtype=torch.int32)
    assert "not a multiple of 32" in codes_blocks(_grid(q, s, z, 16), "q4_k").reason
    assert codes_blocks(_grid(q, s, z, 16), "q6_k").data is not None        # sub-blocks of 16
    assert "super-blocks of 256" in codes_blocks(_grid(q[:, :128], s[:, :8], z[:, :8], 16), "q6_k").reason
    assert "Q2_K cannot keep" in codes_blocks(_grid(q, s, z, 16), "q2_k").reason
    assert "outside Q3_K's -4..3" in codes_blocks(_grid(q, s, z, 16), "q3_k").reason      # 4-bit codes
    g_idx = torch.arange(256).flip(0) // 16
    perm = SourceGrid(bits=4, group_size=16, sym=False, scales=s, scale_dtype=torch.float16, q=q, zeros=z, g_idx=g_idx)
    assert "act-order" in codes_blocks(perm, "q6_k").reason
    q8 = SourceGrid(bits=8, group_size=16, sym=True, scales=s, scale_dtype=torch.float16,
                    q=torch.randint(0, 256, (4, 256), dtype=torch.int32), zeros=torch.full((4, 16), 128, dtype=torch.int32))
    assert "outside Q6_K's -32..31" in codes_blocks(q8, "q6_k").reason
    q8.scales, q8.zeros = q8.scales[:, ::2].repeat_interleave(2, 1), q8.zeros[:, ::2].repeat_interleave(2, 1)
    assert "8-bit codes do not fit Q5_K" in codes_blocks(q8, "q5_k").reason
