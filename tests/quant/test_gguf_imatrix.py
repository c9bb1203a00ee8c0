"""`quantize --imatrix`: importance-weighted round-to-nearest export against llama.cpp's own
llama_model_quantize given the same importance weights (every tensor's type and bytes), and
llama-quantize's per-tensor type rules for every file type (IQ mixes, Q2_K_S, TQ) with and
without an importance matrix, on a small llama model quantized by llama.cpp itself."""

import numpy as np
import pytest
from gguf import GGUFValueType

from helpers.cli import assert_one_line, run_cli
from helpers.ggml_reference import llama_quantize
from quantkit import api
from quantkit.models.gguf import GGUFSource, write_gguf_file
from quantkit.models.imatrix_file import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from quantkit.models.source import MetaValue
from quantkit.quant.gguf_policy import FILE_TYPES, ModelFacts, TypePolicy, tensor_order
from quantkit.util.errors import QuantkitError


def _synthetic_imatrix(src: GGUFSource, seed: int = 0) -> Imatrix:
    g = np.random.default_rng(seed)
    imx = Imatrix(datasets=["synthetic.txt"], chunk_count=3, chunk_size=512)
    for t in src.tensors():
        if t.name.startswith("blk.") and len(t.shape) == 2:
            n = t.shape[-1]
            imx.entries[t.name] = ImatrixEntry((g.random((1, n)) ** 4 * 1000).astype(np.float32), np.array([1536.0]))
    return imx


@pytest.fixture(scope="module")
def f32_with_imatrix(bundled_gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("imx")
    f32 = str(d / "gemma-f32.gguf")
    llama_quantize(bundled_gguf, f32, "f32")
    src = GGUFSource(f32)
    imx = _synthetic_imatrix(src)
    src.close()
    path = str(d / "imatrix.gguf")
    write_imatrix(imx, path)
    return f32, path, d


@pytest.mark.parametrize("ft", ["q4_0", "q2_k_s"])
def test_rtn_with_imatrix_equals_llama_cpp(f32_with_imatrix, ft):
    """q4_0: the weighted legacy encoders and the rule that moves the first ffn_down layers to
    q4_1 when an imatrix is present; q2_k_s: a file type that needs one, weighted K-quants."""
    f32, path, d = f32_with_imatrix
    imx = read_imatrix(path)
    ref, ours = str(d / f"ref-{ft}.gguf"), str(d / f"ours-{ft}.gguf")
    llama_quantize(f32, ref, ft, imatrix={n: imx.weights(n) for n in imx.entries})
    api.quantize(f32, ours, format=f"gguf:{ft}", imatrix=path, show_progress=False)
    a, b = GGUFSource(ours), GGUFSource(ref)
    try:
        assert [t.name for t in a.tensors()] == [t.name for t in b.tensors()]
        bad = [t.name for t in a.tensors() if a.tensor_info(t.name).type != b.tensor_info(t.name).type
               or not np.array_equal(a.raw(t.name)[0], b.raw(t.name)[0])]
        assert bad == []
        types = {a.tensor_info(t.name).type for t in a.tensors()}
        assert ("q4_1" in types) == (ft == "q4_0")
        m = a.metadata
        assert m["quantize.imatrix.file"].value == path
        assert m["quantize.imatrix.dataset"].value == "synthetic.txt"
        assert m["quantize.imatrix.entries_count"].value == len(imx.entries)
        assert m["quantize.imatrix.chunks_count"].value == 3
    finally:
        a.close()
        b.close()


def test_imatrix_refusals_in_one_line(f32_with_imatrix, tmp_path, capsys):
    f32, path, _ = f32_with_imatrix
    out = str(tmp_path / "o.gguf")
    for ft in ("q2_k_s", "iq2_xs", "iq1_m"):
        code, err = run_cli(["quantize", f32, "--format", f"gguf:{ft}", "-o", out], capsys)
        assert code != 0
        assert_one_line(err, "importance matrix", "quantkit imatrix")
    # an imatrix of another model: its first entry whose size differs is named
    imx = read_imatrix(path)
    imx.entries["blk.3.ffn_up.weight"] = ImatrixEntry(np.ones((1, 100), np.float32), np.array([1.0]))
    other = str(tmp_path / "other.gguf")
    write_imatrix(imx, other)
    code, err = run_cli(["quantize", f32, "--format", "gguf:q4_k_m", "--imatrix", other, "-o", out], capsys)
    assert code != 0
    assert_one_line(err, "blk.3.ffn_up.weight", "another model")
    code, err = run_cli(["quantize", f32, "--format", "gguf:q4_0+gptq", "--imatrix", path, "-o", out], capsys)
    assert code != 0
    assert_one_line(err, "--imatrix")
    trunc = str(tmp_path / "trunc.gguf")
    with open(path, "rb") as f:
        raw = f.read()
    with open(trunc, "wb") as f:
        f.write(raw[: len(raw) // 2])
    code, err = run_cli(["quantize", f32, "--format", "gguf:q4_0", "--imatrix", trunc, "-o", out], capsys)
    assert code != 0
    assert_one_line(err, "trunc.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.gguf", "trunc.gguf"]


# ---- llama-quantize's type rules on a small llama, quantized by llama.cpp itself -------------

def _small_llama(path, n_head_kv: int) -> str:
    """8 layers (so the first-eighth rules fire on one), rows of 256 except ffn_down's 544
    (not a multiple of 256: llama.cpp's fallback types); GQA when n_head_kv < 4."""
    g = np.random.default_rng(1)
    n_embd, n_ff, n_layer, vocab = 256, 544, 8, 320
    meta = {"general.architecture": MetaValue("llama", GGUFValueType.STRING),
            "llama.block_count": MetaValue(n_layer, GGUFValueType.UINT32),
            "llama.embedding_length": MetaValue(n_embd, GGUFValueType.UINT32),
            "llama.feed_forward_length": MetaValue(n_ff, GGUFValueType.UINT32),
            "llama.attention.head_count": MetaValue(4, GGUFValueType.UINT32),
            "llama.attention.head_count_kv": MetaValue(n_head_kv, GGUFValueType.UINT32),
            "llama.context_length": MetaValue(256, GGUFValueType.UINT32),
            "llama.attention.layer_norm_rms_epsilon": MetaValue(1e-6, GGUFValueType.FLOAT32),
            "tokenizer.ggml.model": MetaValue("none", GGUFValueType.STRING)}
    kv = n_embd // 4 * n_head_kv
    t = {"token_embd.weight": (vocab, n_embd), "output_norm.weight": (n_embd,), "output.weight": (vocab, n_embd)}
    for i in range(n_layer):
        t.update({f"blk.{i}.attn_norm.weight": (n_embd,), f"blk.{i}.attn_q.weight": (n_embd, n_embd),
                  f"blk.{i}.attn_k.weight": (kv, n_embd), f"blk.{i}.attn_v.weight": (kv, n_embd),
                  f"blk.{i}.attn_output.weight": (n_embd, n_embd), f"blk.{i}.ffn_norm.weight": (n_embd,),
                  f"blk.{i}.ffn_gate.weight": (n_ff, n_embd), f"blk.{i}.ffn_up.weight": (n_ff, n_embd),
                  f"blk.{i}.ffn_down.weight": (n_embd, n_ff)})
    # the rules look at names and row lengths only: 4 rows per matrix keep llama.cpp's run short
    t = {n: (min(s[0], 4),) + s[1:] if len(s) == 2 else s for n, s in t.items()}
    arrays = {n: (g.standard_normal(s) * 0.05).astype(np.float32) for n, s in t.items()}
    write_gguf_file(str(path), "llama", meta, [(n, a.shape, "f32") for n, a in arrays.items()],
                    lambda n: arrays[n].view(np.uint8))
    return str(path)


def _our_types(src: GGUFSource, ft: str, has_imatrix: bool) -> dict[str, str]:
    infos = {t.name: t for t in src.tensors()}
    names = tensor_order(list(infos))
    s = src.spec
    policy = TypePolicy(ft, names, ModelFacts(s.arch, s.n_layer, s.n_head, s.n_head_kv, s.n_expert),
                        has_imatrix=has_imatrix)
    return {n: policy.choose(n, infos[n].shape, "f32") for n in names}


@pytest.mark.parametrize("n_head_kv", [1, 4])
def test_type_rules_equal_llama_quantize(tmp_path, n_head_kv):
    model = _small_llama(tmp_path / "small.gguf", n_head_kv)
    src = GGUFSource(model)
    weights = {t.name: np.random.default_rng(2).random(t.shape[-1]).astype(np.float32) + 0.1
               for t in src.tensors() if t.name.startswith("blk.") and len(t.shape) == 2}
    out = str(tmp_path / "q.gguf")
    try:
        for ft in FILE_TYPES:
            if ft in ("f32", "f16", "bf16"):
                continue
            for with_imatrix in (True, False):
                ours = _our_types(src, ft, with_imatrix)
                try:
                    llama_quantize(model, out, ft, imatrix=weights if with_imatrix else None, nthread=1)
                except AssertionError:          # llama.cpp refused: a tensor needs an imatrix
                    assert not with_imatrix
                    from quantkit.quant.gguf_policy import requires_imatrix
                    assert any(requires_imatrix(n, t, ft) for n, t in ours.items()), ft
                    continue
                q = GGUFSource(out)
                theirs = {t.name: t.type for t in q.tensors()}
                q.close()
                assert ours == theirs, (ft, with_imatrix, {n: (ours[n], theirs[n]) for n in ours
                                                           if ours[n] != theirs[n]})
    finally:
        src.close()


def test_imatrix_must_match_file(f32_with_imatrix):
    f32, path, _ = f32_with_imatrix
    src = GGUFSource(f32)
    try:
        imx = read_imatrix(path)
        del imx.entries["blk.0.attn_q.weight"]
        imx.entries["blk.99.attn_q.weight"] = ImatrixEntry(np.ones((1, 640), np.float32), np.array([1.0]))
        with pytest.raises(QuantkitError, match="blk.99.attn_q.weight"):
            imx.check_model({t.name: tuple(t.shape) for t in src.tensors()})
    finally:
        src.close()
