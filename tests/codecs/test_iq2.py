"""quantkit's 2-bit lattice codecs (IQ2_XXS, IQ2_XS, IQ2_S) against llama.cpp's own.

Exact: every byte equals libggml's `ggml_quantize_chunk` with the same importance weights
(random positive, all ones, and, for IQ2_S, none), on normal and heavy-tailed random rows of
256/512/1024, on Gemma-3-270M's own rows, on all-zero and one-huge-value blocks; decoders equal
ggml's to the bit on random bytes. IQ2_XXS and IQ2_XS refuse to encode without weights, as
llama.cpp does (ggml_quantize_requires_imatrix).
"""

import numpy as np
import pytest
import torch

import llama_cpp  # a declared dependency: its absence must fail, not skip

from helpers.ggml_reference import ggml_dequantize, ggml_quantize  # noqa: E402
from quantkit.codecs import iq2_lattice  # noqa: E402
from quantkit.codecs.registry import can_encode, qtype  # noqa: E402

TYPES = ["iq2_xxs", "iq2_xs", "iq2_s"]


def _rows(seed: int, n: int, rows: int = 8) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    f32 = np.float32
    normal = g.standard_normal((rows, n)).astype(f32)
    c = {"normal": normal, "heavy": g.standard_t(2, size=(rows, n)).astype(f32),
         "cauchy": g.standard_cauchy(size=(rows, n)).astype(f32) * f32(0.01)}
    z = normal.copy()
    z[0] = 0.0                                     # an all-zero row
    z[1, :256] = 0.0                               # an all-zero super-block
    z[2, 32:64] = 0.0                              # an all-zero sub-block (every type's)
    z[3, 8:16] = 0.0                               # an all-zero group of 8
    z[4, :256] = -0.0
    z[5, ::2] = 0.0
    c["zeros"] = z
    h = normal.copy()
    h[:, 7::256] *= 1e4                            # one huge value per super-block
    h[0, 100] = 3e6
    c["huge"] = h
    c["tiny"] = normal * f32(1e-12)
    c["ints"] = g.integers(-3, 4, size=(rows, n)).astype(f32)
    c["sparse"] = normal * (g.random((rows, n)) < 0.05)
    c["denormal"] = normal * f32(1e-40)
    return c


def _importance(seed: int, n: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(100 + seed)
    return {"random": (g.random(n) * 4 + 0.01).astype(np.float32),
            "ones": np.ones(n, np.float32),
            "skewed": np.exp(g.standard_normal(n) * 2).astype(np.float32),
            "zeros": np.where(g.random(n) < 0.3, 0, g.random(n) * 3).astype(np.float32) * (np.arange(n) >= 256)}


def _assert_same(qt: str, ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    if not np.array_equal(ours, ref):
        bad = np.nonzero((ours != ref).any(axis=1))[0]
        raise AssertionError(f"{qt} {what}: rows {bad[:8].tolist()} of {len(ref)} differ")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("qt", TYPES)
@pytest.mark.parametrize("seed,n", [(0, 256), (1, 512), (2, 1024)])
def test_bytes_equal_llama_cpp_with_importance(qt, seed, n):
    q = qtype(qt)
    for case, x in _rows(seed, n).items():
        for wname, w in _importance(seed, n).items():
            ours = q.quantize_rows(torch.from_numpy(x), imatrix=torch.from_numpy(w)).numpy()
            _assert_same(qt, ours, ggml_quantize(qt, x, w), f"{case}/{wname}")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("seed,n", [(0, 256), (3, 1024)])
def test_iq2_s_bytes_equal_llama_cpp_without_importance(seed, n):
    q = qtype("iq2_s")
    for case, x in _rows(seed, n).items():
        _assert_same("iq2_s", q.quantize_rows(torch.from_numpy(x)).numpy(), ggml_quantize("iq2_s", x), case)


@pytest.mark.parametrize("qt", ["iq2_xxs", "iq2_xs"])
def test_types_that_need_importance_refuse_without(qt):
    q = qtype(qt)
    assert q.needs_imatrix and q.imatrix_used and can_encode(qt)
    with pytest.raises(ValueError, match="importance matrix"):
        q.quantize_rows(torch.zeros(2, 256))
    assert not qtype("iq2_s").needs_imatrix


@pytest.mark.parametrize("qt", TYPES)
def test_decode_random_bytes_equals_ggml(qt):
    q = qtype(qt)
    g = np.random.default_rng(5)
    b = g.integers(0, 256, size=(300, q.type_size), dtype=np.uint8)
    d = (g.standard_normal(300) * 10.0 ** g.integers(-6, 3, 300)).astype(np.float16)
    b[:, :2] = d.reshape(-1, 1).view(np.uint8)
    ours = q.dequantize_rows(torch.from_numpy(b.reshape(30, -1)), 2560).numpy()
    ref = ggml_dequantize(qt, b.reshape(-1), 2560)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qt", TYPES)
def test_quantize_then_decode_equals_ggml_and_fits(qt):
    x = np.random.default_rng(7).standard_normal((4, 1024)).astype(np.float32)
    w = np.ones(1024, np.float32)
    q = qtype(qt)
    data = q.quantize_rows(torch.from_numpy(x), imatrix=torch.from_numpy(w))
    y = q.dequantize_rows(data, 1024).numpy()
    assert np.array_equal(y, ggml_dequantize(qt, data.numpy(), 1024))
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert rel < {"iq2_xxs": 0.5, "iq2_xs": 0.45, "iq2_s": 0.4}[qt], rel


@pytest.mark.usefixtures("one_thread")
def test_bytes_equal_llama_cpp_on_real_weights(bundled_gguf):
    """Gemma-3-270M's own weights (decoded by ggml from the bundled file's Q4_K/Q6_K tensors)."""
    from quantkit.models.gguf import GGUFSource

    src = GGUFSource(bundled_gguf)
    try:
        name = "blk.0.attn_output.weight"
        data, typ = src.raw(name)
        n = tuple(src.tensor_info(name).shape)[-1]
        x = ggml_dequantize(qtype(typ).name, np.asarray(data).reshape(-1), n)[:48]
    finally:
        src.close()
    act = (np.random.default_rng(0).random(n) * 3 + 0.05).astype(np.float32)   # imatrix-like
    for qt in TYPES:
        ours = qtype(qt).quantize_rows(torch.from_numpy(x), imatrix=torch.from_numpy(act)).numpy()
        _assert_same(qt, ours, ggml_quantize(qt, x, act), name)


@pytest.mark.parametrize("grid_size,nwant", [(256, 2), (512, 2), (1024, 1)])
def test_neighbour_lists_are_llama_cpps_shells(grid_size, nwant):
    """Every off-grid point lists exactly the grid entries in its `nwant` nearest distance shells."""
    lat = iq2_lattice.lattice(grid_size, nwant)
    g = np.random.default_rng(grid_size)
    for _ in range(50):
        p = g.integers(0, 3, 8)
        u = int((p << iq2_lattice.SHIFTS).sum())
        r = lat.kmap[u]
        if r >= 0:
            assert (lat.levels[r] == p).all()
            continue
        row = -r - 1
        listed = lat.flat[lat.start[row]:lat.start[row] + lat.count[row]]
        d2 = ((lat.levels.astype(int) - p) ** 2).sum(axis=1)
        shells = np.unique(d2)[:nwant]
        want = np.nonzero(np.isin(d2, shells))[0]
        assert sorted(listed.tolist()) == want.tolist()
        assert (np.diff(d2[listed]) >= 0).all()


IQ2_BY_TENSOR = {"attn_q": "iq2_xxs", "attn_k": "iq2_xs", "attn_v": "iq2_s", "attn_output": "iq2_xxs",
                 "ffn_gate": "iq2_xs", "ffn_up": "iq2_s", "ffn_down": "iq2_xxs"}


@pytest.mark.usefixtures("one_thread")
def test_iq2_gguf_loads_and_generates_in_llama_cpp(gptq_llama_dir, tmp_path):
    """A tiny llama (rows of 256 and 512) written by quantkit with IQ2_XXS / IQ2_XS / IQ2_S
    tensors (per-tensor types, importance weights from the rows' own magnitudes): llama.cpp
    reads every tensor as the type written and generates."""
    from quantkit.models.gguf import GGUFSource
    from quantkit.models.hf import HFSource
    from quantkit.quant.gguf_export import export_gguf, plan_gguf

    out = tmp_path / "iq2.gguf"
    with HFSource(gptq_llama_dir) as src:
        infos, plan = plan_gguf(src, "f32")
        plan = [(n, shp, next((t for k, t in IQ2_BY_TENSOR.items() if f".{k}." in n), typ)) for n, shp, typ in plan]
        types = {n: t for n, _, t in plan}
        assert sorted(set(types.values())) == ["f32", "iq2_s", "iq2_xs", "iq2_xxs"]

        def precomputed(name):
            if not types[name].startswith("iq2"):
                return None
            x = src.load(name).float().reshape(-1, infos[name].shape[-1])
            imp = (x * x).mean(dim=0) + 1e-3
            return qtype(types[name]).quantize_rows(x, imatrix=imp).numpy().reshape(-1)

        export_gguf(src, out, "f32", show_progress=False, precomputed=precomputed, plan=plan)
    with GGUFSource(str(out)) as g:
        for n, t in types.items():
            assert g.tensor_info(n).type == t, n
    # logits_all: without it llama-cpp-python writes only the last row of `scores` (the rest is
    # uninitialised memory)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, n_threads=2, seed=0, logits_all=True)
    try:
        res = llm.create_completion("The", max_tokens=6, temperature=0.0)
        assert res["usage"]["completion_tokens"] >= 1
        llm.reset()
        llm.eval(llm.tokenize(b"The history of the", add_bos=True))
        assert np.isfinite(np.asarray(llm.scores[:llm.n_tokens])).all()
    finally:
        llm.close()


def _reference_neighbour(lat, u, scale, xval, w):
    """iq2_find_best_neighbour transcribed one query at a time (float32 scalars, C's order)."""
    r = -int(lat.kmap[u]) - 1
    best, idx = np.float32(np.finfo(np.float32).max), -1
    for j in lat.flat[lat.start[r]:lat.start[r] + lat.count[r]]:
        q = (2 * lat.levels[j].astype(np.float32) + 1)
        d2 = np.float32(0)
        for i in range(8):
            diff = np.float32(scale * q[i]) - xval[i]
            d2 = np.float32(d2 + np.float32(np.float32(w[i] * diff) * diff))
        if d2 < best:
            best, idx = d2, int(j)
    return idx


@pytest.mark.parametrize("grid_size,nwant", [(256, 2), (512, 2), (1024, 1)])
def test_best_neighbour_equals_the_c_loop(grid_size, nwant):
    """Many queries per point (the batched products) and exact ties (equal weights, values on the
    lattice): the first smallest entry in list order, as C's strict `<` picks it."""
    lat = iq2_lattice.lattice(grid_size, nwant)
    g = np.random.default_rng(grid_size)
    off = np.flatnonzero(lat.kmap < 0)
    off = off[np.isin(off, (np.arange(3 ** 8)[:, None] // 3 ** np.arange(8) % 3 << iq2_lattice.SHIFTS).sum(1))]
    pts = g.choice(off, 12, replace=False)
    u = np.repeat(pts, 40)
    lev = (u[:, None] >> iq2_lattice.SHIFTS) & 3
    scale = (g.random(len(u)) + 0.5).astype(np.float32)
    xval = (scale[:, None] * (2 * lev + 1) + g.standard_normal((len(u), 8)) * 0.6 * scale[:, None]).astype(np.float32)
    w = (g.random((len(u), 8)) + 0.1).astype(np.float32)
    tie = np.arange(len(u)) % 3 == 0                       # on-lattice values, equal weights
    xval[tie] = (scale[tie, None] * (2 * lev[tie] + 1)).astype(np.float32)
    w[tie] = 1
    got = iq2_lattice.best_neighbour(lat, u, scale, xval, w)
    want = [_reference_neighbour(lat, int(u[k]), scale[k], xval[k], w[k]) for k in range(len(u))]
    assert got.tolist() == want


def test_threads_chunks_and_bad_input():
    """Row chunks on worker threads give the same bytes; NaN, rows that are not whole
    super-blocks and importance vectors of the wrong length are refused."""
    from quantkit.codecs.parallel import NonFiniteError

    q = qtype("iq2_s")
    x = torch.from_numpy(np.random.default_rng(9).standard_normal((600, 256)).astype(np.float32))
    w = torch.rand(256) + 0.1
    one = q.quantize_rows(x, imatrix=w, threads=1)
    assert torch.equal(one, q.quantize_rows(x, imatrix=w, threads=2))
    assert np.array_equal(one.numpy(), ggml_quantize("iq2_s", x.numpy(), w.numpy()))
    bad = x[:4].clone()
    bad[1, 3] = float("nan")
    with pytest.raises(NonFiniteError):
        q.quantize_rows(bad, imatrix=w, check_finite=True)
    with pytest.raises(ValueError):
        qtype("iq2_xs").quantize_rows(torch.zeros(2, 300), imatrix=torch.ones(300))
    with pytest.raises(ValueError, match="importance weights of 255"):
        qtype("iq2_xxs").quantize_rows(torch.zeros(2, 256), imatrix=torch.ones(255))
