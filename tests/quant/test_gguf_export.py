"""The bundled model through quantkit's GGUF writer, checked against llama.cpp's own quantizer
(llama_model_quantize, as `llama-quantize --allow-requantize` runs it) and runtime."""

import os

import numpy as np
import pytest

from helpers.ggml_reference import llama_quantize
from quantkit import api
from quantkit.runtimes.llama_cpp import LlamaCpp
from quantkit.models.gguf import GGUFSource

PROMPT = "The history of the Roman Empire"


@pytest.fixture(scope="module")
def f32_source(bundled_gguf, tmp_path_factory):
    """The bundled Q4_K_M model dequantized to an F32 GGUF by llama.cpp: the common F32 input."""
    out = str(tmp_path_factory.mktemp("ref") / "gemma-f32-llama.gguf")
    llama_quantize(bundled_gguf, out, "f32")
    return out


def _tensors_equal(a: str, b: str) -> list[str]:
    ra, rb = GGUFSource(a), GGUFSource(b)
    assert [t.name for t in ra.tensors()] == [t.name for t in rb.tensors()]
    bad = []
    for t in ra.tensors():
        ta, tb = ra.tensor_info(t.name), rb.tensor_info(t.name)
        if ta.type != tb.type or not np.array_equal(ra.raw(t.name)[0], rb.raw(t.name)[0]):
            bad.append(f"{t.name} ({ta.type} vs {tb.type})")
    return bad


@pytest.fixture(scope="module")
def exported(f32_source, tmp_path_factory):
    """(quantkit's file, llama-quantize's file) for a file type, from the same F32 input; cached."""
    d = tmp_path_factory.mktemp("export")
    cache = {}

    def get(ft):
        if ft not in cache:
            ref, ours = str(d / f"llama-{ft}.gguf"), str(d / f"ours-{ft}.gguf")
            llama_quantize(f32_source, ref, ft)
            api.quantize(f32_source, ours, format=f"gguf:{ft}", show_progress=False)
            cache[ft] = (ours, ref)
        return cache[ft]
    return get


def test_gguf_dequantization_equals_llama_cpp_f32(bundled_gguf, f32_source):
    """Every tensor of the Q4_K_M file (Q8_0, Q5_0, Q4_K, Q6_K, F32) read as float32 by quantkit
    equals, bit for bit, llama.cpp's F32 requantization of it."""
    ours, ref = GGUFSource(bundled_gguf), GGUFSource(f32_source)
    assert [t.name for t in ours.tensors()] == [t.name for t in ref.tensors()]
    assert {t.type for t in ours.tensors()} >= {"q8_0", "q5_0", "q4_k", "q6_k", "f32"}
    for t in ours.tensors():
        a = ours.load(t.name).numpy()
        b = ref.raw(t.name)[0].view(np.float32).reshape(a.shape)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), t.name


@pytest.mark.parametrize("ft", ["q8_0", "q5_1", "q4_0", "bf16", "q4_k_m", "q3_k_m"])
def test_file_bytes_equal_llama_quantize(exported, ft):
    ours, ref = exported(ft)
    assert _tensors_equal(ours, ref) == []
    assert os.path.getsize(ours) == os.path.getsize(ref)
    assert open(ours, "rb").read() == open(ref, "rb").read()   # the whole file, metadata too


def test_pure_uses_one_type_everywhere(f32_source, tmp_path):
    ref = str(tmp_path / "llama-pure.gguf")
    ours = str(tmp_path / "ours-pure.gguf")
    llama_quantize(f32_source, ref, "q4_0", pure=True)
    res = api.quantize(f32_source, ours, format="gguf:q4_0", pure=True, show_progress=False)
    assert res.types["token_embd.weight"] == "q4_0"          # not llama.cpp's Q6_K->Q8_0 choice
    assert {t for n, t in res.types.items() if n.endswith("norm.weight")} == {"f32"}
    assert open(ours, "rb").read() == open(ref, "rb").read()


@pytest.mark.parametrize("ft", ["q8_0", "q4_0"])
def test_runs_in_llama_cpp_with_same_greedy_continuation(exported, ft):
    outs = []
    for path in exported(ft):
        rt = LlamaCpp(path, n_ctx=128, n_threads=2)
        outs.append(rt.generate(PROMPT, max_tokens=12))
        rt.close()
    assert len(outs[0].tokens) >= 4 and outs[0].text.strip()
    assert outs[0].tokens == outs[1].tokens


def test_tokenizer_ids_equal_llama_cpp_on_wikitext(bundled_gguf, exported, data_dir):
    """The written file carries the tokenizer: llama.cpp tokenizes a page of wikitext-2 identically
    with quantkit's file and with the original."""
    text = open(os.path.join(data_dir, "wikitext-2", "test.txt"), encoding="utf-8").read()[:4000]
    ours = exported("q8_0")[0]
    a = LlamaCpp(ours, n_ctx=64).tokenize(text)
    b = LlamaCpp(bundled_gguf, n_ctx=64).tokenize(text)
    assert len(a) > 500
    assert a == b
    assert "Robert" in LlamaCpp(ours, n_ctx=64).llm.detokenize(a).decode()


def test_inspect_bundled(bundled_gguf):
    info = api.inspect(bundled_gguf)
    a = info["architecture"]
    assert (a["arch"], a["n_layer"], a["n_embd"], a["head_dim"], a["n_head_kv"], a["n_vocab"]) == \
        ("gemma3", 18, 640, 256, 1, 262144)
    assert a["tied_embeddings"] and a["sliding_window"] == 512
    assert sum(a["sliding_window_pattern"]) == 15
    assert info["parameters"] == sum(int(np.prod(t["shape"])) for t in info["tensors"])
    assert 268_000_000 < info["parameters"] < 269_000_000
    assert info["file_bytes"] > info["tensor_bytes"] > 0
    assert abs(info["bits_per_weight"] - 8 * info["tensor_bytes"] / info["parameters"]) < 1e-9
    assert info["tokenizer"]["model"] == "llama" and info["tokenizer"]["n_tokens"] == 262144


def test_load_rows_equals_rows_of_the_whole_tensor(bundled_gguf):
    """GGUFSource.load_rows reads and dequantizes only the rows asked for: equal to the same rows
    of the whole tensor for every 2-D storage type in the bundled file (K-quants, legacy, F32)."""
    import torch
    with GGUFSource(bundled_gguf) as src:
        seen = set()
        for t in src.tensors():
            if len(t.shape) != 2 or t.type in seen:
                continue
            seen.add(t.type)
            whole = src.load(t.name)
            rows = t.shape[0]
            for r0, r1 in ((0, 1), (3, min(rows, 40)), (rows - 2, rows)):
                assert torch.equal(src.load_rows(t.name, r0, r1), whole[r0:r1]), (t.name, t.type, r0, r1)
        assert len(seen) >= 2, seen
        with pytest.raises(IndexError):
            src.load_rows("token_embd.weight", 5, 10**9)
