"""quantkit's lattice codecs (IQ3_XXS, IQ3_S, IQ1_S, IQ1_M) against llama.cpp's own.

Exact: every byte equals libggml's `ggml_quantize_chunk` (quantize_iq3_xxs / iq3_s / iq1_s /
iq1_m) with the same importance weights (random positive, all-ones, log-normal, some zero) and
without any where llama.cpp allows that, on Gaussian and heavy-tailed rows of 256 and 512
columns, all-zero blocks and sub-blocks, one huge value per block, tiny and subnormal values,
exact ties, and real rows of the bundled model (dequantized Q4_K: many equal values, so the IQ1
sort's order among ties matters). Decoders equal ggml's dequantize_row_* to the bit.
Values so large that llama.cpp's neighbour distances overflow make llama.cpp abort: quantkit
raises ValueError there instead.
"""

import numpy as np
import pytest
import torch

import llama_cpp  # noqa: F401  (a declared dependency: its absence must fail, not skip)

from helpers.ggml_reference import ggml_dequantize, ggml_quantize  # noqa: E402
from quantkit.codecs.registry import qtype  # noqa: E402

TYPES = ["iq3_xxs", "iq3_s", "iq1_s", "iq1_m"]
F32 = np.float32


def _cases(n: int, seed: int = 0, rows: int = 8) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    normal = g.standard_normal((rows, n)).astype(F32)
    c = {"normal": normal}
    z = normal.copy()
    z[0, :256] = 0.0                              # an all-zero super-block
    z[1, 32:64] = 0.0                             # an all-zero sub-block of 32 ...
    z[2, 0:16] = 0.0                              # ... and of 16 (IQ1_M)
    z[3, 8:16] = 0.0                              # a zero group of 8
    z[4, ::2] = 0.0                               # half the values zero
    z[5] = 0.0                                    # an all-zero row
    z[6, :256] = -0.0                             # negative zeros
    z[7, 0:224] = 0.0                             # one live sub-block at the end
    z[7, 32:64] = 1e-9                            # below IQ3_XXS's and IQ1_M's group epsilon
    c["zeros"] = z
    h = normal.copy()
    h[:, 7::256] *= 1e4                           # one huge value per super-block
    h[:, 100::256] = 1e6
    c["huge"] = h
    h = normal.copy()
    h[:, 5::256] = -3e12                          # its squares overflow the weighted sums
    c["huge12"] = h
    c["heavy"] = g.standard_t(2, size=(rows, n)).astype(F32)
    c["cauchy"] = g.standard_cauchy(size=(rows, n)).astype(F32)
    c["tiny"] = normal * F32(1e-8)
    c["tiny20"] = normal * F32(1e-20)
    c["subnormal"] = normal * F32(1e-39)
    c["ints"] = g.integers(-8, 8, size=(rows, n)).astype(F32)                 # ties everywhere
    c["few_values"] = g.choice([-1.0, 0.0, 0.5, 2.0], size=(rows, n)).astype(F32)
    c["mixed_scales"] = (normal * np.exp(g.uniform(-12, 12, (rows, n // 16))).repeat(16, 1)).astype(F32)
    c["sparse"] = (normal * (g.random((rows, n)) < 0.05)).astype(F32)
    c["positive"] = np.abs(normal) + 3
    c["negative"] = -np.abs(normal)
    c["const"] = np.repeat(g.standard_normal((rows, n // 32)), 32, axis=1).astype(F32)
    return c


def _weights(n: int, seed: int = 0) -> dict[str, np.ndarray | None]:
    g = np.random.default_rng(seed + 100)
    w = {"none": None, "ones": np.ones(n, F32), "random": (g.random(n) * 2 + 0.01).astype(F32),
         "lognormal": np.exp(g.normal(0, 2, n)).astype(F32)}
    zw = w["random"].copy()
    zw[::5] = 0
    zw[32:64] = 0                                 # a sub-block with no weight at all
    w["somezero"] = zw
    return w


CASES = {n: _cases(n) for n in (256, 512)}
WEIGHTS = {n: _weights(n) for n in (256, 512)}


def _ours(qt, x, w):
    return qtype(qt).quantize_rows(torch.from_numpy(x), imatrix=None if w is None else torch.from_numpy(w)).numpy()


def _check(qt, x, w, what):
    ref = ggml_quantize(qt, x, w)
    ours = _ours(qt, x, w)
    assert ours.shape == ref.shape
    bad = (ours != ref).any(axis=1)
    assert not bad.any(), f"{qt} {what}: rows {np.flatnonzero(bad)[:8]} differ"
    return ref


def _bits(a):
    return np.ascontiguousarray(a, dtype=F32).view(np.uint32)


@pytest.mark.parametrize("n", [256, 512])
@pytest.mark.parametrize("case", list(CASES[256]))
@pytest.mark.parametrize("qt", TYPES)
def test_bytes_equal_llama_cpp(qt, case, n):
    x = CASES[n][case]
    for wname, w in WEIGHTS[n].items():
        if w is None and qtype(qt).needs_imatrix:
            continue
        ref = _check(qt, x, w, f"{case}/{n}/{wname}")
        if wname in ("none", "random"):
            ours = qtype(qt).dequantize(torch.from_numpy(ref), x.shape).numpy()
            assert np.array_equal(_bits(ours), _bits(ggml_dequantize(qt, ref, n))), f"{qt} decode {case}"


@pytest.mark.parametrize("qt", TYPES)
def test_bytes_equal_llama_cpp_more_seeds(qt):
    for seed in (1, 2, 3):
        g = np.random.default_rng(seed)
        x = np.concatenate([g.standard_normal((6, 512)), g.standard_t(3, size=(6, 512)) * 0.02]).astype(F32)
        w = (g.random(512) ** 3 + 1e-3).astype(F32)
        _check(qt, x, w, f"seed {seed}")
        if not qtype(qt).needs_imatrix:
            _check(qt, x, None, f"seed {seed} unweighted")


@pytest.mark.parametrize("qt", TYPES)
def test_bytes_equal_llama_cpp_on_real_weights(qt, bundled_gguf):
    """Rows of Gemma-3-270M (decoded by ggml from Q4_K / Q6_K: few distinct values per block)."""
    from quantkit.models.gguf import GGUFSource

    src = GGUFSource(bundled_gguf)
    try:
        for name in ("blk.0.attn_output.weight", "blk.0.ffn_down.weight"):
            data, typ = src.raw(name)
            n = tuple(src.tensor_info(name).shape)[-1]
            x = ggml_dequantize(qtype(typ).name, np.asarray(data).reshape(-1), n)[:24]
            w = np.random.default_rng(7).gamma(0.5, size=n).astype(F32) + F32(1e-4)
            _check(qt, x, w, name)
            if not qtype(qt).needs_imatrix:
                _check(qt, x, None, f"{name} unweighted")
    finally:
        src.close()


@pytest.mark.parametrize("qt", TYPES)
def test_dequantize_random_bytes_equals_ggml(qt):
    g = np.random.default_rng(5)
    q = qtype(qt)
    b = g.integers(0, 256, size=(512, q.type_size), dtype=np.uint8)
    h = g.integers(0, 0x7C00, size=512).astype(np.uint16) | (g.integers(0, 2, size=512).astype(np.uint16) << 15)
    if qt == "iq1_m":                             # the fp16 scale in the top nibbles of scales[0..7]
        for k in range(4):
            sc = b[:, 48 + 2 * k:50 + 2 * k].copy().view(np.uint16)[:, 0]
            sc = (sc & 0x0FFF) | (((h >> (4 * k)) & 0xF) << 12)
            b[:, 48 + 2 * k:50 + 2 * k] = sc.astype(np.uint16).view(np.uint8).reshape(-1, 2)
    else:
        b[:, :2] = h.view(np.uint8).reshape(-1, 2)
    ours = q.dequantize_blocks(torch.from_numpy(b)).numpy()
    ref = ggml_dequantize(qt, b.reshape(1, -1), 512 * 256).reshape(512, 256)
    assert np.array_equal(_bits(ours), _bits(ref))


@pytest.mark.parametrize("v", [1e20, 1e30])
def test_overflowing_values(v):
    """Where the sums overflow float32, llama.cpp aborts (GGML_ASSERT on a neighbour search that
    finds nothing, or on a NaN scale) for IQ3_* and unweighted IQ1_M: quantkit raises ValueError
    there; weighted IQ1_S / IQ1_M go on in llama.cpp, and so do their bytes here."""
    x = np.random.default_rng(0).standard_normal((2, 512)).astype(F32)
    x[:, 3::256] = v
    w = np.random.default_rng(1).random(512).astype(F32) + F32(0.1)
    for qt, qw in (("iq3_xxs", None), ("iq3_xxs", w), ("iq3_s", None), ("iq3_s", w), ("iq1_m", None)):
        with pytest.raises(ValueError, match="too large"):
            _ours(qt, x, qw)
    for qt in ("iq1_s", "iq1_m"):
        _check(qt, x, w, f"values of {v}")


def test_flags_follow_llama_cpp():
    """ggml_quantize_requires_imatrix: IQ1_S only (IQ1_M's impl takes NULL weights)."""
    assert qtype("iq1_s").needs_imatrix
    assert not any(qtype(t).needs_imatrix for t in ("iq3_xxs", "iq3_s", "iq1_m"))
    assert all(qtype(t).imatrix_used and qtype(t).implemented for t in TYPES)
    with pytest.raises(ValueError, match="importance matrix"):
        qtype("iq1_s").quantize_rows(torch.randn(2, 256))
    with pytest.raises(ValueError, match="importance matrix"):
        qtype("iq1_s").quantize_blocks(torch.randn(2, 256))


def _logits(path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                          n_threads=2, seed=0)
    try:
        llm.eval(ids)
        scores = np.array(llm.scores[:len(ids)], dtype=np.float32)
        gen = []                                   # greedy generation of 8 tokens
        for _ in range(8):
            gen.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(gen[-1:])
        return scores, gen
    finally:
        llm.close()


@pytest.mark.usefixtures("one_thread")
def test_iq3_s_gguf_loads_and_generates_in_llama_cpp(gptq_llama_dir, tmp_path):
    """A tiny llama (rows of 256 and 512) written by quantkit with every decoder linear in IQ3_S
    (importance weights: all ones): llama.cpp loads it, decodes the tensors as quantkit does, and
    its logits follow the F32 file's."""
    import itertools

    from quantkit.models.gguf import GGUFSource
    from quantkit.models.open import open_model
    from quantkit.quant.gguf_export import export_gguf, plan_gguf

    src = open_model(gptq_llama_dir)
    try:
        _, plan = plan_gguf(src, "f32")
        iq = [(n, shp, "iq3_s" if n.startswith("blk.") and len(shp) == 2 else t) for n, shp, t in plan]
        assert sum(t == "iq3_s" for *_, t in iq) == 14
        export_gguf(src, tmp_path / "iq3s.gguf", "f32", plan=iq, show_progress=False)
        export_gguf(src, tmp_path / "f32.gguf", "f32", plan=plan, show_progress=False)
        q3k = [(n, shp, "q3_k" if t == "iq3_s" else t) for n, shp, t in iq]
        export_gguf(src, tmp_path / "q3k.gguf", "f32", plan=q3k, show_progress=False)
        with GGUFSource(tmp_path / "iq3s.gguf") as g:
            data, typ = g.raw("blk.1.ffn_down.weight")
            assert typ == "iq3_s"
            w = src.load("blk.1.ffn_down.weight").numpy()
            ref = ggml_quantize("iq3_s", w)
            assert np.array_equal(np.asarray(data).reshape(ref.shape), ref)
    finally:
        src.close()
    ids = [1] + list(itertools.islice(itertools.cycle(range(20, 900, 37)), 60))
    s_iq, gen = _logits(tmp_path / "iq3s.gguf", ids)
    s_f32, _ = _logits(tmp_path / "f32.gguf", ids)
    assert len(gen) == 8 and all(0 <= t < 1024 for t in gen)
    assert np.isfinite(s_iq).all()
    s_q3k, _ = _logits(tmp_path / "q3k.gguf", ids)

    def corr(a):
        return np.corrcoef(a.ravel(), s_f32.ravel())[0, 1]
    print(f"logit correlation with F32: IQ3_S {corr(s_iq):.3f}, Q3_K {corr(s_q3k):.3f}")
    assert corr(s_iq) > 0.5 and corr(s_iq) > corr(s_q3k) - 0.05


def test_chunks_and_threads_do_not_change_bytes():
    """Rows split into several chunks on worker threads: the same bytes as one thread, and as
    llama.cpp's."""
    g = np.random.default_rng(9)
    x = g.standard_normal((600, 256)).astype(F32)                  # 3 chunks of 256 rows
    w = (g.random(256) + 0.1).astype(F32)
    for qt in ("iq3_s", "iq1_m"):
        one = qtype(qt).quantize_rows(torch.from_numpy(x), imatrix=torch.from_numpy(w), threads=1)
        two = qtype(qt).quantize_rows(torch.from_numpy(x), imatrix=torch.from_numpy(w), threads=2)
        assert torch.equal(one, two)
        assert np.array_equal(one.numpy(), ggml_quantize(qt, x, w))
    blocks = qtype("iq3_xxs").quantize_blocks(torch.from_numpy(x), threads=2)
    assert np.array_equal(blocks.numpy(), ggml_quantize("iq3_xxs", x))
