"""HF directory -> ModelSource -> GGUF -> llama.cpp.

Tiny randomly initialised llama, mistral, qwen2 and gemma3 models are built here from configs,
with tokenizers trained offline on wikitext-2 (SentencePiece for llama/mistral/gemma3, byte-level
BPE with Llama-3's and Qwen2's pre-tokenizer regexes for the other two), and saved in the Hugging
Face layout. The proof that a conversion is right: llama.cpp, reading the GGUF, tokenizes like
transformers and produces transformers' logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFValueType

from quantkit.models.hf import HFSource
from quantkit.util.errors import QuantkitError
from helpers.tiny_models import build_hf_model, wikitext_lines


# llama.cpp's F32 logits against transformers' F32 logits, relative to the logit scale
# (max |logit|). Both sides compute in float32 with different summation orders: measured
# ~1e-6 for the SiLU models. ggml's CPU GELU (Gemma) reads a table indexed by the f16-rounded
# input, which costs ~3e-4 (measured 2.6e-4), hence the looser bound there.
LOGIT_RTOL = {"llama": 1e-4, "mistral": 1e-4, "llama3": 1e-4, "qwen2": 1e-4, "gemma3": 1e-3}


# --------------------------------------------------------------------------------- helpers


KINDS = ["llama", "mistral", "llama3", "qwen2", "gemma3"]


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """kind -> directory; each tiny model is built on first use, once per session."""
    root = tmp_path_factory.mktemp("hf")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_hf_model(kind, root)
        return built[kind]

    return get


def _write_f32(src: HFSource, path: Path) -> Path:
    from quantkit.quant.gguf_export import export_gguf

    export_gguf(src, path, "f32", pure=True, show_progress=False)
    return path


@pytest.fixture(scope="session")
def ggufs(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            with HFSource(hf_models(kind)) as src:
                done[kind] = _write_f32(src, root / f"{kind}-f32.gguf")
        return done[kind]

    return get


@pytest.fixture(scope="session")
def llamas():
    """path -> llama_cpp.Llama, loaded once per session and closed at its end."""
    import llama_cpp
    cache: dict[str, object] = {}

    def get(path: Path):
        key = str(path)
        if key not in cache:
            cache[key] = llama_cpp.Llama(model_path=key, n_ctx=128, n_batch=128, logits_all=True,
                                         verbose=False, n_threads=2, seed=0,
                                         type_k=0, type_v=0)  # F32 KV cache: compare F32 with F32
        return cache[key]

    yield get
    for llm in cache.values():
        llm.close()


def _hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def _hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


# --------------------------------------------------------------------------------- spec and names


@pytest.mark.parametrize("kind", KINDS)
def test_spec_and_tensor_names(hf_models, kind):
    d = hf_models(kind)
    cfg = json.loads((d / "config.json").read_text())
    with HFSource(d) as src:
        s = src.spec
        assert s.arch == {"mistral": "llama", "llama3": "llama"}.get(kind, kind)
        assert (s.n_layer, s.n_embd, s.n_ff) == (2, 64, 128)
        assert s.n_head == cfg["num_attention_heads"] and s.n_head_kv == cfg["num_key_value_heads"]
        assert s.head_dim == (32 if kind == "gemma3" else 16)
        assert s.n_vocab == cfg["vocab_size"]
        assert s.n_ctx_train == 256
        assert s.tied_embeddings == (kind in ("llama3", "qwen2", "gemma3"))
        names = [t.name for t in src.tensors()]
        assert len(names) == len(set(names))
        assert names[0] in ("token_embd.weight", "rope_freqs.weight")
        assert ("output.weight" in names) == (not s.tied_embeddings)
        block = {n.split(".", 2)[2] for n in names if n.startswith("blk.0.")}
        expect = {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                  "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                  "ffn_down.weight"}
        if kind == "qwen2":
            expect |= {"attn_q.bias", "attn_k.bias", "attn_v.bias"}
        if kind == "gemma3":
            expect |= {"attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight",
                       "post_ffw_norm.weight"}
        assert block == expect
        assert {n for n in names if n.startswith("blk.1.")} == {f"blk.1.{b}" for b in expect}
        assert ("rope_freqs.weight" in names) == (kind == "llama3")
        for t in src.tensors():
            assert tuple(src.load(t.name).shape) == t.shape
        info = {t.name: t for t in src.tensors()}
        assert info["blk.0.attn_q.weight"].shape == (s.n_head * s.head_dim, s.n_embd)
        assert info["blk.0.attn_k.weight"].shape == (s.n_head_kv * s.head_dim, s.n_embd)
        assert info["token_embd.weight"].type == ("bf16" if kind == "mistral" else "f32")

        m = src.metadata
        a = s.arch
        assert m["general.architecture"].value == a
        assert m[f"{a}.block_count"].value == 2
        assert m[f"{a}.embedding_length"].value == 64
        assert m[f"{a}.attention.head_count_kv"].value == s.n_head_kv
        assert m["tokenizer.ggml.model"].value == ("gpt2" if kind in ("llama3", "qwen2") else "llama")
        assert len(m["tokenizer.ggml.tokens"].value) == s.n_vocab  # padded to the embedding rows


def test_arch_specific_metadata(hf_models):
    with HFSource(hf_models("gemma3")) as g:
        m = g.metadata
        assert m["gemma3.attention.sliding_window"].value == 4
        assert m["gemma3.attention.sliding_window_pattern"].value == [True, False]
        assert g.spec.sliding_window_pattern == [True, False]
        assert m["gemma3.final_logit_softcapping"].value == pytest.approx(30.0)
        assert m["gemma3.rope.freq_base"].value == pytest.approx(1e6)
        assert m["gemma3.rope.freq_base_swa"].value == pytest.approx(1e4)
        assert m["gemma3.attention.key_length"].value == 32
        assert m["tokenizer.ggml.add_space_prefix"].value is False
        assert m["tokenizer.ggml.bos_token_id"].value == 2
    with HFSource(hf_models("llama3")) as l3:
        assert l3.tokenizer.pre == "llama-bpe"
        assert l3.metadata["llama.rope.freq_base"].value == pytest.approx(500000.0)
        assert l3.metadata["tokenizer.ggml.add_bos_token"].value is True
        assert len(l3.metadata["tokenizer.ggml.merges"].value) > 100
    with HFSource(hf_models("qwen2")) as q:
        assert q.tokenizer.pre == "qwen2"
        assert q.metadata["tokenizer.ggml.add_bos_token"].value is False
        assert "<|im_start|>" in q.metadata["tokenizer.chat_template"].value
        toks = q.metadata["tokenizer.ggml.tokens"].value
        types = q.metadata["tokenizer.ggml.token_type"].value
        assert len(toks) == q.spec.n_vocab and toks[-1] == f"[PAD{q.spec.n_vocab - 1}]" and types[-1] == 5
        assert types[toks.index("<|im_end|>")] == 3
    with HFSource(hf_models("llama")) as l2:
        m = l2.metadata
        assert m["tokenizer.ggml.pre"].value == "default"
        assert "tokenizer.ggml.add_space_prefix" not in m      # llama.cpp's default (true) applies
        assert m["llama.rope.dimension_count"].value == 16
        types = m["tokenizer.ggml.token_type"].value
        assert types[0] == 2 and types[1] == 3 and types[3] == 6  # <unk>, <s>, <0x00>


# --------------------------------------------------------------------------------- transforms


def _hf_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


def test_llama_qk_rows_permuted_for_rope(hf_models):
    d = hf_models("llama")
    hf = _hf_state(d)
    with HFSource(d) as src:
        for which, n_heads in (("q", 4), ("k", 2)):
            w_hf = hf[f"model.layers.1.self_attn.{which}_proj.weight"]
            w = src.load(f"blk.1.attn_{which}.weight")
            hd = 16
            for h in range(n_heads):
                for j in range(hd // 2):
                    # llama.cpp rotates pairs (2j, 2j+1); HF rotates (j, j + hd/2)
                    assert torch.equal(w[h * hd + 2 * j], w_hf[h * hd + j])
                    assert torch.equal(w[h * hd + 2 * j + 1], w_hf[h * hd + hd // 2 + j])
        assert torch.equal(src.load("blk.0.attn_v.weight"), hf["model.layers.0.self_attn.v_proj.weight"])
        assert torch.equal(src.load("output.weight"), hf["lm_head.weight"])


def test_gemma3_norms_shifted_and_qwen2_biases_kept(hf_models):
    d = hf_models("gemma3")
    hf = _hf_state(d)
    with HFSource(d) as src:
        for gg, hn in (("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
                       ("blk.1.attn_q_norm.weight", "model.layers.1.self_attn.q_norm.weight"),
                       ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
                       ("output_norm.weight", "model.norm.weight")):
            assert torch.equal(src.load(gg), hf[hn] + 1)
        # no q/k permutation for Gemma (llama.cpp uses NeoX-style rotary for it)
        assert torch.equal(src.load("blk.0.attn_q.weight"), hf["model.layers.0.self_attn.q_proj.weight"])
    d = hf_models("qwen2")
    hf = _hf_state(d)
    with HFSource(d) as src:
        assert torch.equal(src.load("blk.0.attn_q.bias"), hf["model.layers.0.self_attn.q_proj.bias"])
        assert torch.equal(src.load("blk.0.attn_k.weight"), hf["model.layers.0.self_attn.k_proj.weight"])


def test_sharded_bf16_and_pytorch_bin_give_same_tensors(hf_models, tmp_path):
    d = hf_models("mistral")
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("*.safetensors"))) > 1
    hf = _hf_state(d)
    # the same weights as one pytorch_model.bin
    b = tmp_path / "bin"
    shutil.copytree(d, b, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    torch.save({k: v.to(torch.bfloat16) for k, v in hf.items()}, b / "pytorch_model.bin")
    with HFSource(d) as st, HFSource(b, trust_pickle=True) as pt:
        assert [t.name for t in st.tensors()] == [t.name for t in pt.tensors()]
        for t in st.tensors():
            assert torch.equal(st.load(t.name), pt.load(t.name)), t.name
        assert st.load("blk.0.ffn_up.weight").dtype == torch.float32


def test_gemma3_multimodal_layout_reads_as_text_model(hf_models, tmp_path):
    """Gemma3ForConditionalGeneration: model_type "gemma3", the text config under text_config,
    text weights under model.language_model.*, a vision tower that is left out."""
    from safetensors.torch import save_file

    d = hf_models("gemma3")
    mm = _copy(d, tmp_path / "mm")
    text_cfg = json.loads((d / "config.json").read_text())
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {k: v for k, v in text_cfg.items() if k != "architectures"},
           "eos_token_id": [1, 106]}
    (mm / "config.json").write_text(json.dumps(cfg))
    state = {k.replace("model.", "model.language_model.", 1): v for k, v in _hf_state(d).items()}
    state["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    (mm / "model.safetensors").unlink()
    save_file(state, str(mm / "model.safetensors"))
    with HFSource(d) as a, HFSource(mm) as b:
        assert b.spec == a.spec
        assert [t.name for t in b.tensors()] == [t.name for t in a.tensors()]
        for t in a.tensors():
            assert torch.equal(a.load(t.name), b.load(t.name)), t.name
        assert b.metadata["tokenizer.ggml.eos_token_id"].value == 1
        assert b.metadata["gemma3.attention.sliding_window"].value == 4


# --------------------------------------------------------------------------------- GGUF round trip


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "gemma3"])
def test_gguf_f32_round_trip_identical(hf_models, ggufs, kind):
    """HF dir -> GGUF F32 -> read back: the same tensors bit for bit, the same metadata."""
    from quantkit.models.gguf import GGUFSource

    with HFSource(hf_models(kind)) as src, GGUFSource(ggufs(kind)) as back:
        assert {t.name for t in back.tensors()} == {t.name for t in src.tensors()}
        for t in src.tensors():
            b = back.tensor_info(t.name)
            assert b.type == "f32" and b.shape == t.shape, t.name
            assert torch.equal(back.load(t.name), src.load(t.name)), t.name
        for key, mv in src.metadata.items():
            got = back.metadata[key]
            assert got.vtype == mv.vtype, key
            if isinstance(mv.value, float):
                assert got.value == pytest.approx(mv.value, rel=1e-7), key
            elif mv.sub_type == GGUFValueType.FLOAT32:
                assert np.allclose(np.asarray(got.value, dtype=np.float32), np.asarray(mv.value, dtype=np.float32),
                                   rtol=0, atol=0), key
            else:
                assert list(got.value) == list(mv.value) if isinstance(mv.value, list) else got.value == mv.value, key
        assert back.spec.n_layer == src.spec.n_layer and back.spec.head_dim == src.spec.head_dim
        assert back.spec.tied_embeddings == src.spec.tied_embeddings


# --------------------------------------------------------------------------------- llama.cpp


SPM_KINDS = ("llama", "mistral", "gemma3")


@pytest.mark.parametrize("kind", KINDS)
def test_llamacpp_tokenizes_like_transformers(hf_models, ggufs, llamas, kind):
    """Token ids from llama.cpp's tokenizer (reading only the GGUF) equal transformers' on a page
    of wikitext-2 test text, and, for SentencePiece vocabularies, sentencepiece's own."""
    from transformers import AutoTokenizer

    d = hf_models(kind)
    llm = llamas(ggufs(kind))
    # wikitext writes "<unk>" as text: tokenize it as text on both sides
    tok = AutoTokenizer.from_pretrained(str(d), split_special_tokens=True)
    sp = None
    if kind in SPM_KINDS:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    lines = wikitext_lines("test.txt", 40)
    lines += ["Hello world,  two spaces and\ttab", " leading space", "digits 1234567 and 3.14",
              "naïve café — “quotes” 東京"]
    n_tokens = 0
    for line in lines:
        ours = llm.tokenize(line.encode("utf-8"), add_bos=False, special=False)
        if sp is not None:
            assert ours == sp.encode(line), line
        # transformers' Metaspace does not add SentencePiece's dummy prefix to text that already
        # starts with a space; llama.cpp and sentencepiece do
        if not (sp is not None and line[:1].isspace()):
            assert ours == tok(line, add_special_tokens=False)["input_ids"], line
            # with special tokens added: BOS exactly where transformers puts one
            assert llm.tokenize(line.encode("utf-8"), add_bos=True) == tok(line)["input_ids"], line
        n_tokens += len(ours)
    assert n_tokens > 1000


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_llamacpp_parses_special_tokens_like_transformers(hf_models, ggufs, llamas, kind):
    # (SentencePiece vocabularies differ by design here: llama.cpp puts the dummy-prefix space
    # after every special token, as the original sentencepiece Llama tokenizer did)
    d = hf_models(kind)
    llm = llamas(ggufs(kind))
    tok = _hf_tokenizer(d)
    text = ("<|im_start|>user\nWhat is the Royal Court Theatre?<|im_end|>\n<|im_start|>assistant\n"
            if kind == "qwen2" else "<|begin_of_text|>The Bill in 2000 .<|end_of_text|>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
    assert any(i >= len(tok) - 3 for i in ids)  # the special tokens were matched


@pytest.mark.parametrize("kind", KINDS)
def test_llamacpp_logits_match_transformers(hf_models, ggufs, llamas, kind):
    d = hf_models(kind)
    llm = llamas(ggufs(kind))
    tok = _hf_tokenizer(d)
    text = "The tower is 324 metres tall, about the same height as an 81-storey building."
    ids = tok(text)["input_ids"]
    assert len(ids) > 8     # longer than gemma3's sliding window of 4
    with torch.no_grad():
        ref = _hf_model(d)(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    llm.reset()
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    assert got.shape == ref.shape
    scale = np.abs(ref).max()
    err = np.abs(got - ref).max() / scale
    assert scale > 1.0, "random model too flat to prove anything"
    assert err < LOGIT_RTOL[kind], f"{kind}: max |diff| / max |logit| = {err:.2e}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_llamacpp_greedy_generation_matches_transformers(hf_models, ggufs, llamas, kind):
    d = hf_models(kind)
    llm = llamas(ggufs(kind))
    tok = _hf_tokenizer(d)
    prompt = tok("Robert Boulter is an English")["input_ids"]
    n_new = 8
    llm.reset()
    out = []
    for t in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(t)
        if len(out) == n_new:
            break
    assert len(out) == n_new
    with torch.no_grad():
        ref = _hf_model(d).generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                                    min_new_tokens=n_new)[0, len(prompt):].tolist()
    assert out == ref


# --------------------------------------------------------------------------------- bad input


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(QuantkitError, match="no such model directory"):
        HFSource(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(QuantkitError, match="no config.json"):
        HFSource(tmp_path)


def test_unsupported_architecture_names_it_and_lists_supported(hf_models, tmp_path):
    d = _copy(hf_models("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match="unsupported architecture GPT2LMHeadModel") as e:
        HFSource(d)
    assert "LlamaForCausalLM" in str(e.value) and "Gemma3ForCausalLM" in str(e.value)


def test_corrupt_config(hf_models, tmp_path):
    d = _copy(hf_models("llama"), tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(QuantkitError, match="config.json"):
        HFSource(d)


@pytest.mark.parametrize("cut", [5, 60, -100])
def test_truncated_safetensors(hf_models, tmp_path, cut):
    d = _copy(hf_models("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(QuantkitError, match="corrupt or truncated safetensors") as e:
        HFSource(d)
    assert "model.safetensors" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_weights_and_missing_shard(hf_models, tmp_path):
    d = _copy(hf_models("llama"), tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(QuantkitError, match="no weights"):
        HFSource(d)
    d = _copy(hf_models("mistral"), tmp_path / "s")
    sorted(d.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(QuantkitError, match="missing"):
        HFSource(d)


def test_no_tokenizer(hf_models, tmp_path):
    d = _copy(hf_models("llama"), tmp_path / "m")
    for f in ("tokenizer.model", "tokenizer.json"):
        (d / f).unlink()
    with pytest.raises(QuantkitError, match="no tokenizer"):
        HFSource(d)


def test_unrecognised_pre_tokenizer_names_the_file(hf_models, tmp_path):
    d = _copy(hf_models("qwen2"), tmp_path / "m")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(QuantkitError, match="unrecognised byte-level BPE pre-tokenizer") as e:
        HFSource(d)
    assert "tokenizer.json" in str(e.value)


def test_corrupt_tokenizer_model(hf_models, tmp_path):
    d = _copy(hf_models("llama"), tmp_path / "m")
    (d / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(QuantkitError, match="tokenizer.model"):
        HFSource(d)


def test_config_that_does_not_match_the_weights(hf_models, tmp_path):
    d = _copy(hf_models("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_attention_heads"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match="does not match the weights"):
        HFSource(d)
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match="no valid hidden_size"):
        HFSource(d)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("ft", ["q4_0", "q8_0", "q4_k_m"])
def test_hf_to_quantized_gguf_equals_llama_quantize(hf_models, ggufs, tmp_path, kind, ft):
    """HF directory -> quantized GGUF in one step gives the bytes llama-quantize gives from the
    F32 conversion, and the file generates in llama.cpp."""
    import llama_cpp
    from helpers.ggml_reference import llama_quantize
    from quantkit.quant.gguf_export import export_gguf

    ours, ref = tmp_path / f"ours-{ft}.gguf", tmp_path / f"ref-{ft}.gguf"
    with HFSource(hf_models(kind)) as src:
        export_gguf(src, ours, ft, show_progress=False)
    llama_quantize(str(ggufs(kind)), str(ref), ft)
    assert ours.read_bytes() == ref.read_bytes()
    llm = llama_cpp.Llama(model_path=str(ours), n_ctx=64, verbose=False, n_threads=2, seed=0)
    out = llm.create_completion("The", max_tokens=4, temperature=0.0)
    llm.close()
    assert out["usage"]["completion_tokens"] >= 1
