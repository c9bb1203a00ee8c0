"""quantkit's IQ4_NL and IQ4_XS codecs against llama.cpp's own, byte for byte.

Encoding equals `ggml_quantize_chunk` (quantize_iq4_nl / quantize_iq4_xs) with and without
importance weights, on random tensors of several seeds and shapes, heavy-tailed ones, all-zero
and one-huge-value blocks, tiny and subnormal scales, and Gemma-3-270M's own weights. Decoding
equals ggml's dequantize_row to the bit, on encoded and on random bytes.
"""

import numpy as np
import pytest
import torch

import llama_cpp  # noqa: F401  (a declared dependency: its absence must fail, not skip)

from helpers.ggml_reference import ggml_dequantize, ggml_quantize  # noqa: E402
from quantkit.codecs.registry import qtype  # noqa: E402

TYPES = ["iq4_nl", "iq4_xs"]


def _cases(seed: int, n: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    f32 = np.float32
    normal = g.standard_normal((48, n)).astype(f32)
    small = normal[:16]
    c = {"normal": normal, "heavy": g.standard_t(2, size=(16, n)).astype(f32),
         "cauchy": g.standard_cauchy(size=(16, n)).astype(f32)}
    z = small.copy()
    z[::3, :256] = 0.0                               # all-zero blocks and super-blocks
    z[1, 32:64] = 0.0                                # one all-zero 32-block in a super-block
    z[4, ::2] = 0.0
    z[7, :256] = -0.0                                # negative zeros
    c["zeros"] = z
    h = small.copy()
    h[:, 7::32] *= 1e4                               # one huge value per block
    c["huge"] = h
    h = small.copy()
    h[:, 5::256] = 6.0e4                             # one huge value per super-block: fp16 scales saturate
    h[:3, 9::256] = -1.0e8                           # and overflow
    c["huge_superblock"] = h
    c["negative"] = -np.abs(small)
    c["positive"] = np.abs(small) + 3.0
    c["tiny"] = small * f32(1e-8)                    # fp16 scales underflow
    c["eps"] = small * f32(1e-15)                    # around GROUP_MAX_EPS
    c["subnormal"] = small * f32(1e-39)
    c["ints"] = g.integers(-8, 8, size=(16, n)).astype(f32)
    c["levels"] = g.choice([-127.0, -10.0, 1.0, 13.0, 113.0], size=(16, n)).astype(f32)   # on the codebook
    c["mixed_scales"] = (small * np.exp(g.uniform(-12, 12, (16, n // 32))).repeat(32, 1)).astype(f32)
    c["sparse"] = (small * (g.random((16, n)) < 0.05)).astype(f32)
    return c


def _imatrices(seed: int, n: int) -> dict[str, np.ndarray | None]:
    g = np.random.default_rng(seed + 100)
    w = {"none": None, "uniform": g.random(n).astype(np.float32) * 4,
         "lognormal": np.exp(g.normal(0, 2, n)).astype(np.float32)}
    z = w["uniform"].copy()
    z[::5] = 0.0                                     # zero weights, and one all-zero block
    z[32:64] = 0.0
    w["zeros"] = z
    return w


def _differ(qt: str, ours: np.ndarray, ref: np.ndarray) -> int:
    ts = qtype(qt).type_size
    return int((ours.reshape(-1, ts) != ref.reshape(-1, ts)).any(axis=1).sum())


def _check(qt: str, x: np.ndarray, imatrix: np.ndarray | None, what: str) -> None:
    ours = qtype(qt).quantize_rows(torch.from_numpy(x), imatrix=None if imatrix is None else torch.from_numpy(imatrix))
    ours = ours.numpy()
    ref = ggml_quantize(qt, x, imatrix=imatrix)
    assert ours.shape == ref.shape == (x.shape[0], qtype(qt).row_bytes(x.shape[1]))
    assert np.array_equal(ours, ref), f"{qt}/{what}: {_differ(qt, ours, ref)} blocks differ"


@pytest.mark.parametrize("qt", TYPES)
@pytest.mark.parametrize("seed,n", [(0, 512), (1, 256), (2, 512)])
def test_bytes_equal_llama_cpp(qt, seed, n):
    for case, x in _cases(seed, n).items():
        for wname, w in _imatrices(seed, n).items():
            _check(qt, x, w, f"{case}/imatrix={wname}")


@pytest.mark.parametrize("qt", TYPES)
def test_bytes_equal_llama_cpp_on_real_weights(qt, bundled_gguf):
    """Gemma-3-270M's weights (decoded from its Q4_K/Q6_K tensors), with an importance matrix
    from the squares of random activations, and without."""
    from quantkit.models.gguf import GGUFSource

    src = GGUFSource(bundled_gguf)
    checked = 0
    try:
        for name in ("blk.0.attn_output.weight", "blk.0.ffn_down.weight", "blk.3.ffn_gate.weight"):
            data, typ = src.raw(name)
            n = int(src.tensor_info(name).shape[-1])
            if n % qtype(qt).block_size:             # rows of 640: IQ4_NL only
                continue
            checked += 1
            x = ggml_dequantize(qtype(typ).name, np.asarray(data).reshape(-1), n)[:96]
            act = np.random.default_rng(5).standard_normal((64, n)).astype(np.float32)
            imatrix = (act * act).mean(axis=0).astype(np.float32)
            for w in (None, imatrix):
                _check(qt, x, w, f"{name}/imatrix={w is not None}")
    finally:
        src.close()
    assert checked >= 2


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qt", TYPES)
def test_dequantize_equals_ggml(qt):
    for case, x in _cases(3, 512).items():
        data = ggml_quantize(qt, x)
        ours = qtype(qt).dequantize(torch.from_numpy(data), x.shape).numpy()
        assert np.array_equal(_bits(ours), _bits(ggml_dequantize(qt, data, 512))), case


@pytest.mark.parametrize("qt", TYPES)
def test_dequantize_random_bytes_equals_ggml(qt):
    """Every bit field: random bytes, with finite fp16 scales."""
    g = np.random.default_rng(4)
    ts = qtype(qt).type_size
    b = g.integers(0, 256, size=(1024, ts), dtype=np.uint8)
    h = g.integers(0, 0x7C00, size=1024).astype(np.uint16) | (g.integers(0, 2, size=1024).astype(np.uint16) << 15)
    b[:, :2] = h.view(np.uint8).reshape(-1, 2)
    bs = qtype(qt).block_size
    ours = qtype(qt).dequantize_blocks(torch.from_numpy(b)).numpy()
    ref = ggml_dequantize(qt, b.reshape(1, -1), 1024 * bs).reshape(1024, bs)
    assert np.array_equal(_bits(ours), _bits(ref))


@pytest.mark.parametrize("qt", TYPES)
def test_chunks_threads_and_layouts(qt):
    """Several chunks on two threads, a non-contiguous input, bfloat16, and zero rows: the same
    bytes as llama.cpp."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(512, 96, generator=g).t()          # [96, 512], non-contiguous
    w = torch.rand(512, generator=g)
    ref = ggml_quantize(qt, np.ascontiguousarray(x.numpy()), imatrix=w.numpy())
    for threads in (1, 2):
        assert np.array_equal(qtype(qt).quantize_rows(x, threads=threads, imatrix=w).numpy(), ref)
    ref = ggml_quantize(qt, np.ascontiguousarray(x.numpy()))
    assert np.array_equal(qtype(qt).quantize_rows(x, threads=2).numpy(), ref)
    xb = x[:4].to(torch.bfloat16)
    assert np.array_equal(qtype(qt).quantize_rows(xb).numpy(), ggml_quantize(qt, xb.float().numpy()))
    assert qtype(qt).quantize_rows(torch.zeros(0, 512)).shape == (0, qtype(qt).row_bytes(512))


def test_registered_with_importance_weights():
    for qt in TYPES:
        q = qtype(qt)
        assert q.implemented and q.imatrix_used and not q.needs_imatrix
    assert (qtype("iq4_nl").block_size, qtype("iq4_nl").type_size) == (32, 18)
    assert (qtype("iq4_xs").block_size, qtype("iq4_xs").type_size) == (256, 136)
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        qtype("iq4_xs").quantize_rows(torch.randn(2, 320))
    with pytest.raises(ValueError, match="importance weights of 31 values"):
        qtype("iq4_nl").quantize_rows(torch.randn(2, 64), imatrix=torch.ones(31))


@pytest.mark.parametrize("qt", TYPES)
def test_one_call_over_many_blocks(qt):
    """encode_blocks on more blocks than one search step (GPTQ's grids call the search on whole
    row chunks): the same bytes."""
    x = np.random.default_rng(8).standard_normal((40, 2048)).astype(np.float32)   # 2560 IQ4_NL blocks
    bs = qtype(qt).block_size
    ours = qtype(qt).encode_blocks(torch.from_numpy(x).reshape(-1, bs)).numpy()
    assert np.array_equal(ours.reshape(40, -1), ggml_quantize(qt, x))
