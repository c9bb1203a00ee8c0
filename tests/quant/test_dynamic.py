"""Dynamic int8 numerics: per-channel weights, per-row activations, fbgemm vs reference, LSTM."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantkit.quant import int8_kernels as K

from quantkit.quant.dynamic import (DynamicInt8Config, Int8DynamicLinear, Int8Embedding, Int8LSTM,
                                    prepare_dynamic_, quantize_dynamic_, state_dict_bytes)

pytestmark = pytest.mark.usefixtures("one_thread")


def snr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum().item() / max((ref - x).pow(2).sum().item(), 1e-30))


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 384), (3, 1000)])
def test_weight_round_trip_error_bound(shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    q, s = K.quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0],)
    assert q.abs().max() <= 127
    err = (K.dequantize_weight(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()        # round to nearest: half a step at most


def test_weight_edge_cases():
    w = torch.zeros(3, 8)
    w[1, 2] = 1e6                                          # one huge value only hurts its own row
    w[2] = torch.linspace(-1, 1, 8)
    q, s = K.quantize_weight_per_channel(w)
    assert (q[0] == 0).all() and s[0] == 1.0               # all-zero row: finite scale, zeros
    assert q[1, 2] == 127
    assert torch.allclose(K.dequantize_weight(q, s)[2], w[2], atol=1 / 127)
    with pytest.raises(ValueError):
        K.quantize_weight_per_channel(torch.zeros(4, dtype=torch.int8))


def test_linear_close_to_float_and_per_row_helps():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    x = torch.randn(2, 17, 96)
    x[0, 3] *= 50                                          # an outlier token
    ref = lin(x).detach()
    row = Int8DynamicLinear.from_float(lin, kernel="reference", per_row=True)(x)
    ten = Int8DynamicLinear.from_float(lin, kernel="reference", per_row=False)(x)
    assert row.shape == ref.shape
    assert snr_db(ref, row) > 30
    assert snr_db(ref, row) > snr_db(ref, ten) + 6


@pytest.mark.skipif(not K.fbgemm_available(), reason="no fbgemm kernel in this torch build")
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("rows", [33, 2 * K.ROW_BLOCK + 7])     # one block; several, last partial
@pytest.mark.parametrize("bias", [True, False])
def test_fbgemm_matches_reference(per_row, rows, bias):
    torch.manual_seed(1)
    lin = nn.Linear(384, 100, bias=bias)
    x = torch.randn(rows, 384)
    x[rows // 2] *= 50                                      # an outlier token in a middle block
    a = Int8DynamicLinear.from_float(lin, "fbgemm", per_row)(x)
    b = Int8DynamicLinear.from_float(lin, "reference", per_row)(x)
    assert a.shape == b.shape == (rows, 100)
    # same integer arithmetic; only the activation zero-point nudging may differ by one step
    assert snr_db(b, a) > 40


@pytest.mark.skipif(not K.onednn_available(), reason="no oneDNN int8 kernel in this torch build")
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_matches_reference(per_row, bias):
    torch.manual_seed(2)
    lin = nn.Linear(384, 100, bias=bias)
    x = torch.randn(70, 384)
    x[9] *= 50
    a = Int8DynamicLinear.from_float(lin, "onednn", per_row)(x)
    b = Int8DynamicLinear.from_float(lin, "reference", per_row)(x)
    ref = lin(x).detach()
    assert a.shape == b.shape == (70, 100)
    # per tensor: the same grid as the reference (>= 40 dB apart); per row: a symmetric grid of
    # the same step count instead of the reference's asymmetric one, as close to fp32 as it is
    if per_row:
        assert snr_db(ref, a) > 30 and abs(snr_db(ref, a) - snr_db(ref, b)) < 3
    else:
        assert snr_db(b, a) > 40


@pytest.mark.parametrize("kernel", ["reference"] + (["onednn"] if K.onednn_available() else []))
def test_fused_gelu_post_op(kernel):
    torch.manual_seed(3)
    lin = nn.Linear(64, 96)
    x = torch.randn(2, 9, 64)
    plain = Int8DynamicLinear.from_float(lin, kernel, per_row=False)
    fused = Int8DynamicLinear.from_float(lin, kernel, per_row=False)
    fused.post_op = "gelu"
    assert snr_db(nn.functional.gelu(plain(x)), fused(x)) > 40
    with pytest.raises(ValueError):
        Int8DynamicLinear(4, 4, post_op="relu6")


def test_embedding_rows():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16, padding_idx=0)
    q = Int8Embedding.from_float(emb)
    ids = torch.tensor([[1, 2, 49], [0, 5, 5]])
    ref = emb(ids).detach()
    assert (q(ids) - ref).abs().max() <= q.weight_scale.max() / 2 + 1e-6
    assert q.weight.shape == emb.weight.shape


@pytest.mark.parametrize("batch_first", [False, True])
def test_int8_lstm_matches_float(batch_first):
    torch.manual_seed(0)
    lstm = nn.LSTM(24, 32, num_layers=2, batch_first=batch_first).eval()
    x = torch.randn(5, 7, 24) if batch_first else torch.randn(7, 5, 24)
    h0 = (torch.randn(2, 5, 32) * 0.1, torch.randn(2, 5, 32) * 0.1)
    with torch.no_grad():
        ref, (rh, rc) = lstm(x, h0)
        q = Int8LSTM.from_float(lstm)
        out, (h, c) = q(x, h0)
        out0, _ = q(x)
    assert out.shape == ref.shape and h.shape == rh.shape and c.shape == rc.shape
    assert snr_db(ref, out) > 25 and snr_db(rc, c) > 25
    assert out0.shape == ref.shape
    with pytest.raises(ValueError):
        Int8LSTM.from_float(nn.LSTM(4, 4, bidirectional=True))


def test_quantize_model_and_state_dict_round_trip():
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 16)
            self.lstm = nn.LSTM(16, 16, batch_first=True)
            self.out = nn.Linear(16, 30)
            self.keep = nn.Linear(16, 2)

        def forward(self, ids):
            h, _ = self.lstm(self.emb(ids))
            return self.out(h) + self.keep(h).sum(-1, keepdim=True)

    net = Net().eval()
    ids = torch.randint(0, 30, (3, 9))
    ref = net(ids).detach()
    fp_bytes = state_dict_bytes(net)
    done = quantize_dynamic_(net, DynamicInt8Config(quantize_embeddings=True, skip=["keep"]))
    assert done == {"emb": "embedding", "lstm": "lstm", "out": "linear"}
    assert isinstance(net.keep, nn.Linear)
    assert state_dict_bytes(net) < fp_bytes / 2
    got = net(ids).detach()
    assert snr_db(ref, got) > 20
    # plain tensors only: safetensors holds the state, prepare_dynamic_ rebuilds the structure
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.safetensors")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, p)
        fresh = Net().eval()
        prepare_dynamic_(fresh, done)
        fresh.keep.load_state_dict(net.keep.state_dict())
        fresh.load_state_dict(load_file(p))
        assert torch.equal(fresh(ids), got)


def test_bad_config():
    with pytest.raises(ValueError):
        quantize_dynamic_(nn.Linear(2, 2), DynamicInt8Config(kernel="nope"))
    with pytest.raises(ValueError):
        quantize_dynamic_(nn.Sequential(nn.Linear(2, 2)), DynamicInt8Config(activation_granularity="col"))
