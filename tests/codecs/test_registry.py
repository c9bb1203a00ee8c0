"""The type registry: every type's geometry is gguf-py's table; a new type is one registered
class, after which the public encode and decode paths use it."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.codecs.bits import BlockLayout, f16_bytes, f16_from, pack_nibbles, unpack_nibbles
from quantkit.codecs.registry import QTYPES, QuantType, gptq_types, qtype, register, unregister
from quantkit.models.gguf import dequantize_bytes
from quantkit.quant.gguf_export import can_encode, encode


@pytest.mark.parametrize("name", list(QTYPES))
def test_geometry_is_the_gguf_table(name):
    q = qtype(name)
    assert (q.block_size, q.type_size) == GGML_QUANT_SIZES[q.ggml]
    assert q.name == q.ggml.name.lower()
    layout = getattr(getattr(q, "format", None), "layout", None)
    if layout is not None:                       # the fields tile the block exactly
        spans = sorted((s.start, s.stop) for s in layout.fields.values())
        assert spans[0][0] == 0 and spans[-1][1] == q.type_size
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_what_is_registered():
    assert {q.name for q in QTYPES.values() if q.implemented} == {
        "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k",
        "iq4_nl", "iq4_xs", "tq1_0", "tq2_0", "q1_0", "mxfp4", "nvfp4", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m"}
    assert set(gptq_types()) == {"q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k",
                                 "iq4_nl", "iq4_xs", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m"}
    assert can_encode("Q4_K") and not can_encode("q8_1") and not can_encode("nonsense")


def test_a_layout_that_does_not_fill_the_block_is_refused():
    with pytest.raises(AssertionError, match="the format says 18"):
        BlockLayout(GGMLQuantizationType.Q4_0, ("d", 2), ("qs", 15))


# IQ4_NL's non-linear levels (ggml-common.h kvalues_iq4nl)
_KVALUES = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                        dtype=torch.float32)


class _ToyIQ4NL(QuantType):
    """IQ4_NL with a plain encoder: d = max|x| / 127, each value to its nearest level."""
    ggml = GGMLQuantizationType.IQ4_NL
    layout = BlockLayout(GGMLQuantizationType.IQ4_NL, ("d", 2), ("qs", 16))

    def encode_blocks(self, x):
        d = (x.abs().amax(dim=1) / 127).half().float()
        y = x / torch.where(d > 0, d, torch.ones_like(d))[:, None]
        q = (y[..., None] - _KVALUES).abs().argmin(dim=-1).to(torch.int32)
        return torch.cat([f16_bytes(d), pack_nibbles(q)], dim=1)

    def decode_blocks(self, b):
        d = f16_from(b[:, self.layout.d])
        return d[:, None] * _KVALUES[unpack_nibbles(b[:, self.layout.qs]).long()]


def test_a_new_type_is_one_registered_class():
    """Registering the class is all it takes: the GGUF writer's encode and the reader's decode
    then use it, and its decoder agrees bit for bit with gguf-py's on its bytes."""
    registered = type(qtype("iq4_nl"))           # quantkit's own codec, put back at the end
    unregister("iq4_nl")
    gguf_py = qtype("iq4_nl")                    # now: gguf-py decodes, nothing encodes
    assert not gguf_py.implemented and not can_encode("iq4_nl")
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    register(_ToyIQ4NL)
    try:
        assert isinstance(qtype("iq4_nl"), _ToyIQ4NL) and can_encode("IQ4_NL")
        data = encode("iq4_nl", x)
        assert data.dtype == np.uint8 and data.nbytes == qtype("iq4_nl").nbytes(x.shape) == 6 * 2 * 18
        ours = dequantize_bytes("iq4_nl", data, tuple(x.shape))
        assert torch.equal(ours, gguf_py.dequantize(data, tuple(x.shape)))
        d = x.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
        assert bool(((ours.reshape(-1, 32) - x.reshape(-1, 32)).abs() <= 15 * d).all())  # 127 -> 113 is the farthest
    finally:
        unregister("iq4_nl")
        plain = type(qtype("iq4_nl"))
        register(registered)
    assert plain is QuantType
    assert type(qtype("iq4_nl")) is registered and can_encode("iq4_nl")
