"""GGUF -> Hugging Face directory: transformers loads it with llama.cpp's logits on the same
weights and the tokenizer gives llama.cpp's ids (the bundled Gemma-3's 262k vocabulary too);
GGUF -> HF -> GGUF at F32 gives the same tensors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from quantkit import api
from quantkit.models.gguf import GGUFSource
from quantkit.models.gguf_tokenizer import write_tokenizer
from helpers.cli import assert_one_line, run_cli
from helpers.tiny_models import build_hf_model, wikitext_lines

pytestmark = pytest.mark.usefixtures("one_thread")

# llama.cpp's F32 logits against transformers' on the same F32 weights, relative to max |logit|
# (the bounds tests/models/test_hf.py measured: ggml's GELU table costs Gemma ~3e-4)
LOGIT_RTOL = {"llama": 1e-4, "qwen2": 1e-4, "gemma3": 1e-3}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (original HF dir, its F32 GGUF, the GGUF exported back to HF at f32)."""
    root = tmp_path_factory.mktemp("hfx")
    done = {}

    def get(kind):
        if kind not in done:
            src = build_hf_model(kind, root)
            gguf = root / f"{kind}.gguf"
            api.quantize(str(src), str(gguf), format="gguf:f32", show_progress=False)
            out = root / f"{kind}-hf"
            api.quantize(str(gguf), str(out), format="hf:f32", show_progress=False)
            done[kind] = (src, gguf, out)
        return done[kind]
    return get


def _llama_logits(gguf, ids):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                          n_threads=1, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_export_loads_in_transformers_with_llama_cpp_logits(exported, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src, gguf, out = exported(kind)
    cfg = json.load(open(out / "config.json"))
    assert cfg["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                     "gemma3": "Gemma3ForCausalLM"}[kind]]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    orig = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    text = " ".join(wikitext_lines("valid.txt", 3))[:300]
    ids = tok(text)["input_ids"][:64]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
        theirs = orig(torch.tensor([ids])).logits[0].numpy()
    # the original checkpoint's weights (same values, Gemma's norms shifted there and back)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
    ref = _llama_logits(gguf, ids)
    assert np.abs(ours - ref).max() <= LOGIT_RTOL[kind] * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_tokenizer_ids_equal_llama_cpp(exported, kind):
    import llama_cpp
    from transformers import AutoTokenizer
    _, gguf, out = exported(kind)
    tok = AutoTokenizer.from_pretrained(str(out))
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        for text in wikitext_lines("test.txt", 40) + ["  two  spaces\n\nand ünïcödé 日本語 🙂 <unk> 12345"]:
            for special in (True, False):
                want = llm.tokenize(text.encode(), add_bos=True, special=special)
                assert tok(text, split_special_tokens=not special)["input_ids"] == want, (text, special)
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_gguf_hf_gguf_round_trip_is_identical_at_f32(exported, tmp_path, kind):
    _, gguf, out = exported(kind)
    back = tmp_path / "back.gguf"
    api.quantize(str(out), str(back), format="gguf:f32", show_progress=False)
    with GGUFSource(str(gguf)) as a, GGUFSource(str(back)) as b:
        assert [t.name for t in a.tensors()] == [t.name for t in b.tensors()]
        for t in a.tensors():
            assert torch.equal(a.load(t.name), b.load(t.name)), t.name


def test_bundled_gemma3_tokenizer_ids_equal_llama_cpp(bundled_gguf, tmp_path, data_dir):
    """The 262k-token Gemma-3 vocabulary, where transformers' own GGUF conversion gives other ids."""
    import llama_cpp
    from transformers import AutoTokenizer
    with GGUFSource(bundled_gguf) as src:
        files = write_tokenizer(src.metadata, str(tmp_path), bundled_gguf)
    assert set(files) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"}
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    llm = llama_cpp.Llama(model_path=bundled_gguf, vocab_only=True, verbose=False)
    try:
        with open(os.path.join(data_dir, "wikitext-2", "test.txt"), encoding="utf-8") as f:
            text = f.read(60_000)
        for special in (True, False):
            assert tok(text, split_special_tokens=not special)["input_ids"] == \
                llm.tokenize(text.encode(), add_bos=True, special=special)
    finally:
        llm.close()


def test_hf_format_bad_inputs_end_in_one_line(exported, tmp_path, capsys):
    src, gguf, _ = exported("llama")
    code, err = run_cli(["quantize", str(src), "--format", "hf:f16", "-o", str(tmp_path / "x")], capsys)
    assert code != 0
    assert_one_line(err, "converts a GGUF file")
    code, err = run_cli(["quantize", str(gguf), "--format", "hf:q4_0", "-o", str(tmp_path / "y")], capsys)
    assert code != 0
    assert_one_line(err, "hf takes f32, f16 or bf16")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_hf_dtype_and_cli_summary(exported, tmp_path, capsys):
    from quantkit.cli import main
    _, gguf, _ = exported("llama")
    assert main(["quantize", str(gguf), "--format", "hf:bf16", "--json", "-o", str(tmp_path / "bf")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dtype"] == "bf16" and rep["paths"] == {"cast": len(rep["tensors"])}
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "bf" / "model.safetensors"))
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
