"""GGUF -> Hugging Face for every architecture quantkit reads: a tiny random model of each
(tests/helpers/tiny_models.build_arch_model) converts HF -> GGUF F32 -> HF f32, and the
exported directory loads in transformers with the original model's logits and llama.cpp's
logits of the GGUF, tokenizes a page of wikitext-2 as llama.cpp does (with and without
special-token parsing), and converts back to the same GGUF tensors and hyper-parameters. The
bundled Gemma-3's 262k vocabulary tokenizes as llama.cpp does (transformers' own GGUF reader gives
other ids). A
Q4_K_M file exports to bf16 as its dequantized weights rounded to bf16; an architecture with
no Hugging Face class is one line naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from quantkit import api
from quantkit.models.gguf import GGUFSource, write_gguf_file
from quantkit.models.gguf_tokenizer import write_tokenizer
from quantkit.models.hf import HFSource
from quantkit.models.source import MetaValue
from helpers.cli import assert_one_line, no_partial, run_cli
from helpers.tiny_models import build_arch_model, wikitext_lines

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["llama3", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi2", "phi3", "mixtral",
         "glm4", "olmo2", "granite", "smollm3"]
# transformers' class for each: Mistral without a sliding window is a Llama block in llama.cpp
HF_CLASS = {"llama3": "LlamaForCausalLM", "mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM", "gemma2": "Gemma2ForCausalLM",
            "gemma3": "Gemma3ForCausalLM", "phi2": "PhiForCausalLM", "phi3": "Phi3ForCausalLM",
            "mixtral": "MixtralForCausalLM", "glm4": "Glm4ForCausalLM", "olmo2": "Olmo2ForCausalLM",
            "granite": "GraniteForCausalLM", "smollm3": "SmolLM3ForCausalLM"}
# llama.cpp's F32 logits against transformers' on the same weights, relative to max |logit|
# (tests/models/test_architectures.py: ggml's GELU table costs the GELU families a few 1e-4)
LOGIT_RTOL = {k: 1e-4 for k in KINDS} | {"gemma2": 1e-3, "gemma3": 1e-3, "phi2": 1e-3}


@pytest.fixture(scope="module")
def exported(arch_dirs, arch_f32, tmp_path_factory):
    """kind -> (original HF dir, its F32 GGUF, the GGUF exported back to HF at f32); the first
    two are the session's shared fixtures (conftest.py)."""
    root = tmp_path_factory.mktemp("hfx-arch")
    done: dict[str, tuple[Path, Path, Path]] = {}

    def get(kind: str):
        if kind not in done:
            out = root / f"{kind}-hf"
            api.quantize(str(arch_f32(kind)), str(out), format="hf:f32", show_progress=False)
            done[kind] = (arch_dirs(kind), arch_f32(kind), out)
        return done[kind]
    return get


def _llama_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                          n_threads=1, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _logits(d: Path, ids: list[int], dtype=torch.float32) -> np.ndarray:
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_export_has_the_original_and_llama_cpp_logits(exported, kind):
    from transformers import AutoTokenizer
    src, gguf, out = exported(kind)
    assert json.loads((out / "config.json").read_text())["architectures"] == [HF_CLASS[kind]]
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok(" ".join(wikitext_lines("valid.txt", 4)))["input_ids"][:64]
    assert len(ids) == 64                        # past the Gemma models' sliding window of 4
    ours = _logits(out, ids)
    theirs = _logits(src, ids)
    scale = np.abs(theirs).max()
    assert scale > 1.0, "random model too flat to prove anything"
    assert np.abs(ours - theirs).max() <= 1e-5 * scale
    ref = _llama_logits(gguf, ids)
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    assert err <= LOGIT_RTOL[kind], f"{kind}: max |diff| / max |logit| = {err:.2e}"


def test_smollm3_rotary_free_fourth_layer(tmp_path):
    """SmolLM3 with 4 layers: llama.cpp skips rotary embeddings on layer 3, and the exported
    config's no_rope_layers says so to transformers."""
    src = build_arch_model("smollm3", tmp_path, layers=4)
    gguf, out = tmp_path / "s.gguf", tmp_path / "s-hf"
    api.quantize(str(src), str(gguf), format="gguf:f32", show_progress=False)
    api.quantize(str(gguf), str(out), format="hf:f32", show_progress=False)
    assert json.loads((out / "config.json").read_text())["no_rope_layers"] == [1, 1, 1, 0]
    ids = list(range(3, 67))
    ours, theirs, ref = _logits(out, ids), _logits(src, ids), _llama_logits(gguf, ids)
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("kind,rope", [
    ("mistral", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 1e6})])
def test_rope_scaling_comes_back_into_config(exported, tmp_path, kind, rope):
    """Linear and YaRN scaling keys go back into rope_parameters: the export computes the
    original's logits and converts back to the same GGUF keys."""
    import shutil
    d = tmp_path / kind
    shutil.copytree(exported(kind)[0], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "rope_parameters": rope}))
    gguf, out, back = tmp_path / "a.gguf", tmp_path / "hf", tmp_path / "b.gguf"
    api.quantize(str(d), str(gguf), format="gguf:f32", show_progress=False)
    api.quantize(str(gguf), str(out), format="hf:f32", show_progress=False)
    assert json.loads((out / "config.json").read_text())["rope_parameters"] == {**rope, "rope_theta": 1e6}
    ids = list(range(3, 67))
    ours, theirs = _logits(out, ids), _logits(d, ids)
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    api.quantize(str(out), str(back), format="gguf:f32", show_progress=False)
    with GGUFSource(str(gguf)) as a, GGUFSource(str(back)) as b:
        assert _hparams(a) == _hparams(b)


def test_llama3_rope_parameters_recovered_from_rope_freqs():
    """Llama-3.1-8B's rope_freqs (head 128, theta 5e5, factor 8, low 1, high 4, original 8192)
    give back its rope parameters; factors no llama3 rule makes are refused."""
    import math
    from quantkit.models.hf_export_config import llama3_rope
    from quantkit.util.errors import QuantkitError
    theta, dim, factor, old = 500000.0, 128, 8.0, 8192
    f = []
    for k in range(0, dim, 2):
        wl = 2 * math.pi * theta ** (k / dim)
        s = (old / wl - 1.0) / (4.0 - 1.0)
        f.append(1.0 if wl < old / 4 else factor if wl > old else 1 / ((1 - s) / factor + s))
    f = np.float32(f).tolist()
    assert llama3_rope(f, theta, dim, "x.gguf") == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    with pytest.raises(QuantkitError, match="rope_freqs.weight"):
        llama3_rope([1.0 + 0.1 * i for i in range(64)], theta, dim, "x.gguf")


def _hparams(src: GGUFSource) -> dict:
    """Every key but the name and the vocabulary (compared by tokenization instead)."""
    return {k: v.value for k, v in src.metadata.items() if not k.startswith(("tokenizer.", "general."))}


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_hf_gguf_round_trip_is_identical(exported, tmp_path, kind):
    _, gguf, out = exported(kind)
    back = tmp_path / "back.gguf"
    api.quantize(str(out), str(back), format="gguf:f32", show_progress=False)
    with GGUFSource(str(gguf)) as a, GGUFSource(str(back)) as b:
        assert [(t.name, t.type, t.shape) for t in a.tensors()] == [(t.name, t.type, t.shape) for t in b.tensors()]
        for t in a.tensors():
            assert torch.equal(a.load(t.name), b.load(t.name)), t.name
        assert _hparams(a) == _hparams(b)
        assert a.metadata["tokenizer.ggml.tokens"].value == b.metadata["tokenizer.ggml.tokens"].value


def _page(data_dir: str, gguf: GGUFSource) -> str:
    """~6000 characters of wikitext-2 test with the vocabulary's control tokens spelled in it."""
    with open(os.path.join(data_dir, "wikitext-2", "test.txt"), encoding="utf-8") as f:
        text = f.read(6000)
    tokens = gguf.metadata["tokenizer.ggml.tokens"].value
    types = gguf.metadata["tokenizer.ggml.token_type"].value
    controls = [t for t, ty in zip(tokens, types) if ty == 3][:4]
    assert controls
    return text[:3000] + "".join(f" {c}x" for c in controls) + text[3000:] + "  two  spaces\n\nünïcödé 日本語 🙂 12345"


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_ids_equal_llama_cpp(exported, kind, data_dir):
    import llama_cpp
    from transformers import AutoTokenizer
    _, gguf, out = exported(kind)
    with GGUFSource(str(gguf)) as g:
        text = _page(data_dir, g)
    tok = AutoTokenizer.from_pretrained(str(out))
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        for special in (True, False):
            want = llm.tokenize(text.encode(), add_bos=True, special=special)
            assert len(want) > 1000
            assert tok(text, split_special_tokens=not special)["input_ids"] == want, special
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["llama3", "qwen3moe", "gemma3"])
def test_quantized_gguf_exports_its_dequantized_weights(exported, tmp_path, kind):
    """Q4_K_M -> hf:f32 holds exactly the file's dequantized weights (read back through the
    HF -> GGUF transforms, bit for bit), hf:bf16 those rounded to bf16, and both load."""
    from safetensors.torch import load_file
    src, _, _ = exported(kind)
    q = tmp_path / "q4_k_m.gguf"
    api.quantize(str(src), str(q), format="gguf:q4_k_m", show_progress=False)
    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    api.quantize(str(q), str(f32), format="hf:f32", show_progress=False)
    rep = api.quantize(str(q), str(bf16), format="hf:bf16", show_progress=False)
    assert rep.report["paths"].get("dequantized", 0) > 0
    with GGUFSource(str(q)) as g, HFSource(str(f32), tokenizer=False) as h:
        assert {t.name for t in g.tensors()} == {t.name for t in h.tensors()}
        for t in g.tensors():
            assert torch.equal(g.load(t.name), h.load(t.name)), t.name
    a, b = load_file(str(f32 / "model.safetensors")), load_file(str(bf16 / "model.safetensors"))
    assert a.keys() == b.keys()
    for n in a:
        assert b[n].dtype == torch.bfloat16 and torch.equal(a[n].to(torch.bfloat16), b[n]), n
    ids = list(range(5, 37))
    assert np.isfinite(_logits(bf16, ids, torch.bfloat16)).all()


def test_moe_experts_are_written_one_matrix_per_expert(exported):
    """transformers 5 fuses experts into 3-D parameters in memory, but save_pretrained (and
    published checkpoints) keep one matrix per expert: the export writes that layout."""
    from safetensors import safe_open
    for kind, name in (("qwen3moe", "model.layers.1.mlp.experts.3.gate_proj.weight"),
                       ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w1.weight")):
        _, _, out = exported(kind)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert name in f.keys()
            assert not [k for k in f.keys() if k.endswith(("gate_up_proj", "experts.down_proj"))]


def test_architecture_without_hf_class_is_one_line(exported, tmp_path, capsys):
    """A GGUF of an architecture quantkit does not write back (here the llama file relabelled
    starcoder2) is refused naming it and the supported list; nothing is written."""
    _, gguf, _ = exported("llama3")
    bad = tmp_path / "sc2.gguf"
    with GGUFSource(str(gguf)) as g:
        meta = {(k.replace("llama.", "starcoder2.", 1) if k.startswith("llama.") else k): v
                for k, v in g.metadata.items() if k != "general.architecture"}
        meta["general.architecture"] = MetaValue("starcoder2", meta["general.name"].vtype)
        tensors = [(t.name, t.shape, t.type) for t in g.tensors()]
        write_gguf_file(str(bad), "starcoder2", meta, tensors, lambda n: np.asarray(g.raw(n)[0]).view(np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["quantize", str(bad), "--format", "hf:f32", "-o", str(out / "x")], capsys)
    assert code != 0
    assert_one_line(err, "'starcoder2'", "supported:", "gemma3", "llama", "qwen3moe", "smollm3")
    assert os.listdir(out) == [] and no_partial(out)


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
    src, gguf, _ = exported("llama3")
    code, err = run_cli(["quantize", str(src), "--format", "hf:f16", "-o", str(tmp_path / "x")], capsys)
    assert code != 0
    assert_one_line(err, "converts a GGUF file")
    code, err = run_cli(["quantize", str(gguf), "--format", "hf:q4_0", "-o", str(tmp_path / "y")], capsys)
    assert code != 0
    assert_one_line(err, "hf takes f32, f16 or bf16")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_hf_dtype_and_cli_summary(exported, tmp_path, capsys):
    from quantkit.cli import main
    _, gguf, _ = exported("llama3")
    assert main(["quantize", str(gguf), "--format", "hf:bf16", "--json", "-o", str(tmp_path / "bf")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dtype"] == "bf16" and rep["paths"] == {"cast": len(rep["tensors"])}
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "bf" / "model.safetensors"))
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
