"""Int8 LSTM (quant/dynamic.py Int8LSTM) against torch's fp32 nn.LSTM, with stated bounds.

torch.ao no longer converts nn.LSTM (torch 2.13), so this is quantkit's own: int8 weights per
output channel, the input projection of all steps in one int8 GEMM, the recurrent one per step
on a per-batch grid (h is bounded by 1), gates and cell state in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantkit.quant import int8_kernels as K
from quantkit.quant.dynamic import DynamicInt8Config, Int8LSTM, quantize_dynamic_

pytestmark = pytest.mark.usefixtures("one_thread")


def _lstm_and_input(seed=0, layers=2, n_in=32, hidden=48, T=20, B=4):
    torch.manual_seed(seed)
    lstm = nn.LSTM(n_in, hidden, num_layers=layers).eval()
    return lstm, torch.randn(T, B, n_in)


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_int8_lstm_output_bound(kernel):
    lstm, x = _lstm_and_input()
    with torch.no_grad():
        ref, (rh, rc) = lstm(x)
        out, (h, c) = Int8LSTM.from_float(lstm, kernel=kernel)(x)
    # bound: max |int8 - fp32| <= 0.01 on outputs in (-1, 1) over 20 steps and 2 layers
    # (measured 0.0014 fbgemm, 0.0017 reference; cell state 0.012-0.014 against a 0.04 bound),
    # and the error does not grow along the sequence (mean error of the last 5 steps vs the first 5)
    err = (out - ref).abs()
    assert err.max() <= 0.01, float(err.max())
    assert (c - rc).abs().max() <= 0.04
    assert (err[-5:].mean() <= 3 * err[:5].mean() + 1e-4)


def test_fbgemm_and_reference_lstm_agree():
    if not K.fbgemm_available():
        pytest.skip("no fbgemm kernel")
    lstm, x = _lstm_and_input(seed=1, layers=1)
    with torch.no_grad():
        a, _ = Int8LSTM.from_float(lstm, kernel="fbgemm")(x)
        b, _ = Int8LSTM.from_float(lstm, kernel="reference")(x)
    assert (a - b).abs().max() <= 0.01


def test_int8_word_lm_perplexity_close_to_fp32():
    """A small word LM (embedding, 2-layer LSTM, decoder) trained until it has learnt something:
    the int8 model's perplexity is within 2% of the fp32 one's."""
    torch.manual_seed(0)
    V, T, B = 60, 16, 8

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.dec = nn.Embedding(V, 32), nn.LSTM(32, 64, 2), nn.Linear(64, V)

        def forward(self, x):
            return self.dec(self.rnn(self.emb(x))[0])

    # a text with structure to learn: cycles of a random order with some noise
    order = torch.randperm(V)
    seq = order.repeat(40)
    noise = torch.rand(seq.shape) < 0.1
    seq[noise] = torch.randint(0, V, (int(noise.sum()),))
    data = seq[: (len(seq) // B) * B].view(B, -1).t()
    lm = LM()
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    for step in range(60):
        i = (step * T) % (data.size(0) - T - 1)
        out = lm(data[i:i + T])
        loss = nn.functional.cross_entropy(out.reshape(-1, V), data[i + 1:i + T + 1].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.eval()

    def ppl(m):
        with torch.no_grad():
            x, y = data[:-1], data[1:]
            return math.exp(nn.functional.cross_entropy(m(x).reshape(-1, V), y.reshape(-1)).item())

    p32 = ppl(lm)
    assert p32 < V / 3                                   # it learnt the cycle (uniform would be 60)
    done = quantize_dynamic_(lm, DynamicInt8Config())
    assert done == {"rnn": "lstm", "dec": "linear"}
    p8 = ppl(lm)
    assert abs(p8 / p32 - 1) <= 0.02, (p32, p8)
