"""RTN: codes/scales/zeros against a slow per-group reference (GPTQ's Quantizer formulas), exact
dequantize, error bounded by half a step, packing round trips for every bits x group size."""

import itertools

import pytest
import torch

from quantkit.codecs.intpack import pack_int32, unpack_int32
from quantkit.quant.rtn import GROUP_SIZES, RTN_BITS, QuantSpec, dequantize, quantize_rtn


def slow_rtn(w, bits, gs, sym):
    """One group at a time, plain Python floats where it matters."""
    out_f, in_f = w.shape
    gs = in_f if gs == -1 else gs
    maxq = 2**bits - 1
    q = torch.zeros(out_f, in_f, dtype=torch.int32)
    s_all = torch.zeros(out_f, in_f // gs)
    for r in range(out_f):
        for gi in range(in_f // gs):
            v = w[r, gi * gs:(gi + 1) * gs]
            lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
            if sym:
                s = max(-lo, hi) / (maxq / 2)
            else:
                s = (hi - lo) / maxq
            s = float(torch.tensor(s, dtype=torch.float32).half().float())
            if s == 0:
                s = 1.0
            z = 2 ** (bits - 1) if sym else min(max(round(-lo / s), 0), maxq)
            for c in range(gs):
                x = float(torch.tensor(float(v[c]), dtype=torch.float32) / torch.tensor(s, dtype=torch.float32))
                code = int(torch.round(torch.tensor(x)).item()) + z
                q[r, gi * gs + c] = min(max(code, 0), maxq)
            s_all[r, gi] = s
    return q, s_all


@pytest.mark.parametrize("bits,sym", itertools.product([2, 3, 4, 8], [True, False]))
def test_codes_equal_slow_reference(bits, sym):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 64, generator=g)
    w[0, :32] = 0.0                       # an all-zero group
    w[1, 5] = 40.0                        # one huge value
    w[2] = w[2].abs() + 1                 # positive only
    qw = quantize_rtn(w, QuantSpec(bits, 32, sym))
    q, s = slow_rtn(w, bits, 32, sym)
    assert torch.equal(qw.q, q)
    assert torch.equal(qw.scales.float(), s)
    assert torch.equal(qw.dequantize()[0, :32], torch.zeros(32))


@pytest.mark.parametrize("bits,gs,sym", itertools.product(RTN_BITS, GROUP_SIZES, [True, False]))
def test_every_bits_and_group_size(bits, gs, sym):
    g = torch.Generator().manual_seed(bits * 7 + gs)
    in_f = 2048 if gs == 1024 else 256
    w = torch.randn(5, in_f, generator=g) * 0.02
    spec = QuantSpec(bits, gs, sym)
    qw = quantize_rtn(w, spec)
    n_groups = 1 if gs == -1 else in_f // gs
    assert qw.q.shape == (5, in_f) and qw.scales.shape == (5, n_groups) and qw.zeros.shape == (5, n_groups)
    assert qw.scales.dtype == torch.float16
    assert int(qw.q.min()) >= 0 and int(qw.q.max()) <= spec.maxq
    # exact inverse: (q - z) * s elementwise, groups of consecutive columns
    gw = in_f if gs == -1 else gs
    col_group = torch.arange(in_f) // gw
    expect = (qw.q.float() - qw.zeros.float()[:, col_group]) * qw.scales.float()[:, col_group]
    deq = dequantize(qw.q, qw.scales, qw.zeros, gw)
    assert torch.equal(deq, expect)
    # error at most half a step (plus the fp16 rounding of the scale over the code range)
    step = qw.scales.float()[:, col_group]
    assert ((w - deq).abs() <= step * (0.5 + spec.maxq * 2**-11) + 1e-9).all()
    # the codes survive int32 packing along both axes (GPTQ qweight / compressed-tensors rows)
    if bits in (2, 3, 4, 8):
        assert torch.equal(unpack_int32(pack_int32(qw.q.t(), bits, dim=0), bits, in_f, dim=0), qw.q.t())
    assert torch.equal(unpack_int32(pack_int32(qw.q, bits, dim=1), bits, in_f, dim=1), qw.q)


def test_more_bits_less_error():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    errs = [float((quantize_rtn(w, QuantSpec(b, 128, False)).dequantize() - w).pow(2).mean()) for b in RTN_BITS]
    assert all(a > 3 * b for a, b in zip(errs, errs[1:]))   # each extra bit ~4x lower MSE


def test_bad_input():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_rtn(torch.randn(4, 100), QuantSpec(4, 64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_rtn(torch.tensor([[float("nan")] * 32]), QuantSpec(4, 32))
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(7, 128)
    with pytest.raises(ValueError, match="overflows"):
        quantize_rtn(torch.full((1, 32), 1e9), QuantSpec(4, 32))
