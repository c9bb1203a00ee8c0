"""Every dense architecture end to end: a tiny random Hugging Face model of each (hidden 256,
2 layers, the family's tokenizer kind trained offline) converts to an F32 GGUF that llama.cpp
runs with transformers' logits and greedy continuation, tokenizes a page of text as llama.cpp
does, quantizes to a K-quant mix and to a GPTQ-compensated Q4_0 that load and generate, and
plans from its config.json alone with the tensors the conversion writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from quantkit import api
from quantkit.models.gguf import GGUFSource
from helpers.tiny_models import wikitext_lines

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = ["qwen3moe", "mixtral"]
KINDS = ["llama3", "qwen3", "gemma2", "phi3", "granite", "olmo2", "smollm3", "glm4", "phi2"] + MOE

# llama.cpp's F32 logits against transformers' F32 logits, relative to max |logit|. Both sides
# compute in float32 with different summation orders (~1e-6 measured for the SiLU models).
# ggml's CPU GELU (Gemma's gelu_pytorch_tanh, Phi-2's gelu_new) reads a table indexed by the
# f16-rounded input, which costs a few 1e-4: the bound there is 1e-3.
LOGIT_RTOL = {k: 1e-4 for k in KINDS} | {"gemma2": 1e-3, "phi2": 1e-3}


def _llama(path: Path, logits_all: bool = True):
    import llama_cpp
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=logits_all, verbose=False,
                           n_threads=1, seed=0, type_k=0, type_v=0)


def _greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for t in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(t)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_f32_gguf_runs_like_transformers(arch_dirs, arch_f32, kind):
    """Logits within LOGIT_RTOL, the same argmax everywhere, the same greedy continuation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = arch_dirs(kind)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building.")["input_ids"]
    assert len(ids) > 8                         # past gemma2's sliding window of 4
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        cont = model.generate(torch.tensor([ids[:8]]), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False)[0, 8:].tolist()
    llm = _llama(arch_f32(kind))
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        scale = np.abs(ref).max()
        assert scale > 1.0, "random model too flat to prove anything"
        err = float(np.abs(got - ref).max() / scale)
        assert err < LOGIT_RTOL[kind], f"{kind}: max |diff| / max |logit| = {err:.2e}"
        assert (got.argmax(-1) == ref.argmax(-1)).all()
        assert _greedy(llm, ids[:8], 8) == cont
    finally:
        llm.close()


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_ids_equal_llama_cpp(arch_dirs, arch_f32, kind):
    """A page of wikitext-2 test text (plus spacing, digits, non-ASCII) tokenizes the same in
    llama.cpp, reading only the GGUF, and in transformers."""
    import llama_cpp
    from transformers import AutoTokenizer

    d = arch_dirs(kind)
    tok = AutoTokenizer.from_pretrained(str(d), split_special_tokens=True)
    spm = (d / "tokenizer.model").is_file()
    llm = llama_cpp.Llama(model_path=str(arch_f32(kind)), vocab_only=True, verbose=False)
    try:
        lines = wikitext_lines("test.txt", 40) + ["Hello world,  two spaces and\ttab", "digits 1234567 and 3.14",
                                                  "naïve café — “quotes” 東京"]
        n = 0
        for line in lines:
            ours = llm.tokenize(line.encode("utf-8"), add_bos=False, special=False)
            assert ours == tok(line, add_special_tokens=False)["input_ids"], line
            n += len(ours)
        if not spm:
            text = "<|begin_of_text|>a b<|end_of_text|>" if "<|begin_of_text|>" in tok.get_vocab() else \
                "<|im_start|>user\nhi<|im_end|>"
            plain = AutoTokenizer.from_pretrained(str(d))
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                plain(text, add_special_tokens=False)["input_ids"]
        assert n > 1000
    finally:
        llm.close()


@pytest.mark.parametrize("kind", KINDS)
def test_kquant_mix_and_gptq_q4_0_load_and_generate(arch_dirs, arch_f32, tmp_path, kind, data_dir):
    """Q4_K_M (llama.cpp's per-tensor rules), GPTQ-compensated Q4_0 and BF16: llama.cpp loads
    each and generates; the GPTQ file has the RTN file's tensors, types and shapes, and GPTQ
    changed exactly its Q4_0 decoder linears (mixtures of experts: the 3-D expert tensors too)."""
    d = arch_dirs(kind)
    calib = str(Path(data_dir) / "wikitext-2" / "valid.txt")
    kq = tmp_path / "q4_k_m.gguf"
    rtn = tmp_path / "q4_0.gguf"
    gq = tmp_path / "q4_0-gptq.gguf"
    r = api.quantize(str(d), kq, format="gguf:q4_k_m", show_progress=False)
    assert {"q4_k", "q6_k"} <= set(r.types.values())
    api.quantize(str(d), rtn, format="gguf:q4_0", show_progress=False)
    if kind in MOE:
        with GGUFSource(kq) as s:
            assert s.spec.n_expert == 4 and s.spec.n_expert_used == 2
            assert s.tensor_info("blk.0.ffn_down_exps.weight").shape[0] == 4
    _check_gptq(d, calib, rtn, gq)
    bf16 = tmp_path / "bf16.gguf"
    api.quantize(str(d), bf16, format="gguf:bf16", show_progress=False)
    prompt = None
    for path in (kq, gq, bf16):
        llm = _llama(path, logits_all=False)
        try:
            prompt = prompt or llm.tokenize(b"Robert Boulter is an English", add_bos=True)
            out = _greedy(llm, prompt, 6)
            assert len(out) == 6 and all(0 <= t < llm.n_vocab() for t in out)
        finally:
            llm.close()


def _check_gptq(d: Path, calib: str, rtn: Path, gq: Path) -> None:
    api.quantize(str(d), gq, format="gguf:q4_0", method="gptq", calib=calib, nsamples=4, seqlen=64,
                 show_progress=False)
    with GGUFSource(gq) as a, GGUFSource(rtn) as b:
        assert [(t.name, t.type, t.shape) for t in a.tensors()] == [(t.name, t.type, t.shape) for t in b.tensors()]
        changed = {t.name for t in a.tensors()
                   if not np.array_equal(np.asarray(a.raw(t.name)[0]), np.asarray(b.raw(t.name)[0]))}
        linears = {t.name for t in b.tensors() if t.name.startswith("blk.") and len(t.shape) in (2, 3)
                   and t.type == "q4_0"}
    assert changed == linears and linears


@pytest.mark.parametrize("kind", KINDS)
def test_plan_from_config_alone(arch_dirs, arch_f32, tmp_path, kind):
    """The planner, given config.json alone, lists the tensors (names and shapes) the conversion
    writes, so its memory arithmetic counts what llama.cpp will load."""
    from quantkit.plan.model import build_tensors, from_hf_config

    d = arch_dirs(kind)
    cfg = json.loads((d / "config.json").read_text())
    m = from_hf_config(cfg, kind)
    planned = {t.name: tuple(t.shape) for t in build_tensors(m, "f32")}
    with GGUFSource(arch_f32(kind)) as src:
        written = {t.name: tuple(t.shape) for t in src.tensors() if not t.name.startswith("rope_")}
    assert planned == written


# --------------------------------------------------------------------------------- inspect, bad input


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_inspect_says_what_the_model_is_and_what_quantkit_can_do(arch_dirs, arch_f32, capsys):
    from helpers.cli import run_cli

    code, _ = run_cli(["inspect", str(arch_dirs("phi3")), "--tensors", "0"], capsys)
    assert code == 0
    info = api.inspect(str(arch_dirs("phi3")))["model"]
    assert info["architecture"] == "Phi3ForCausalLM" and info["gguf_architecture"] == "phi3"
    assert info["experts"] == 0 and info["vision_tower"] is None
    assert any(c.startswith("gguf+gptq") for c in info["quantkit_can"])
    # a GGUF is rebuilt in transformers (models.gguf_hf) for GPTQ, experts included
    g = api.inspect(str(arch_f32("phi3")))["model"]
    assert g["gguf_architecture"] == "phi3" and any(c.startswith("gguf+gptq") for c in g["quantkit_can"])
    gm = api.inspect(str(arch_f32("qwen3moe")))["model"]
    assert gm["experts"] == 4 and any(c.startswith("gguf+gptq") for c in gm["quantkit_can"])
    moe = api.inspect(str(arch_dirs("qwen3moe")))["model"]
    assert (moe["architecture"], moe["experts"], moe["experts_used"]) == ("Qwen3MoeForCausalLM", 4, 2)
    assert any(c.startswith("gguf+gptq") for c in moe["quantkit_can"])
    assert any(c.startswith("gpu formats") and "one linear per expert" in c for c in moe["quantkit_can"])


def test_unsupported_architecture_is_one_line_naming_it(arch_dirs, tmp_path, capsys):
    from helpers.cli import assert_one_line, no_partial, run_cli

    d = _copy(arch_dirs("llama3"), tmp_path / "m")
    _edit_config(d, architectures=["FalconForCausalLM"], model_type="falcon")
    out = tmp_path / "out"
    out.mkdir()
    for args in (["inspect", str(d)], ["quantize", str(d), "--format", "gguf:q4_0", "-o", str(out / "x.gguf")]):
        code, err = run_cli(args, capsys)
        assert code != 0
        assert_one_line(err, "unsupported architecture FalconForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
                        "Glm4ForCausalLM", "SmolLM3ForCausalLM")
    assert no_partial(out)


def test_config_contradicting_weights_names_tensor_and_shapes(arch_dirs, tmp_path, capsys):
    from helpers.cli import assert_one_line, no_partial, run_cli

    d = _copy(arch_dirs("qwen3"), tmp_path / "m")
    _edit_config(d, intermediate_size=768)
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["quantize", str(d), "--format", "gguf:q4_k_m", "-o", str(out / "x.gguf")], capsys)
    assert code != 0
    assert_one_line(err, "model.layers.0.mlp.", "[256, 512]", "[256, 768]", "config.json")
    assert no_partial(out)


def test_missing_tokenizer_names_the_files_and_why(arch_dirs, tmp_path, capsys):
    from helpers.cli import assert_one_line, no_partial, run_cli

    d = _copy(arch_dirs("glm4"), tmp_path / "m")
    (d / "tokenizer.json").unlink()
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["quantize", str(d), "--format", "gguf:q8_0", "-o", str(out / "x.gguf")], capsys)
    assert code != 0
    assert_one_line(err, "tokenizer.json", "tokenizer.model", "GGUF")
    assert no_partial(out)


def test_moe_without_router_is_one_line(arch_dirs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from helpers.cli import assert_one_line, no_partial, run_cli

    d = _copy(arch_dirs("qwen3moe"), tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.gate.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["quantize", str(d), "--format", "gguf:q4_k_m", "-o", str(out / "x.gguf")], capsys)
    assert code != 0
    assert_one_line(err, "layer 1 has experts but no router")
    assert no_partial(out)


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in MOE])
def test_gptq_pipeline_output_cache_is_exact(arch_dirs, kind):
    """The pipeline's shortcuts (calibration passes that end at their last input, the attention
    and MLP outputs kept instead of recomputed) give bit for bit the weights and hidden states of
    the plain true-sequential passes on every architecture's block (fused qkv / gate_up, Phi-2's
    parallel block, sandwich and post norms, Granite's residual multiplier)."""
    from transformers import AutoModelForCausalLM
    from quantkit.quant.gptq import GPTQConfig
    from quantkit.quant.pipeline import PipelineConfig, quantize_model
    from quantkit.quant.rtn import QuantSpec

    ids = torch.randint(0, 700, (2, 16), generator=torch.Generator().manual_seed(3))
    out = {}
    for reuse in (True, False):
        m = AutoModelForCausalLM.from_pretrained(str(arch_dirs(kind)), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
        got = {}
        rep = quantize_model(m, ids, PipelineConfig(method="gptq", grid=QuantSpec(4, 32, True, torch.float32),
                                                    gptq=GPTQConfig(), reuse_outputs=reuse),
                             on_block=lambda i, p, layer, q: got.update({f"{p}.{n}": w.dequantize()
                                                                         for n, w in q.items()}),
                             show_progress=False)
        out[reuse] = (got, rep.final_hidden)
    (w1, h1), (w0, h0) = out[True], out[False]
    assert sorted(w1) == sorted(w0) and w1
    for n in w1:
        assert torch.equal(w1[n], w0[n]), n
    for a, b in zip(h1, h0):
        assert torch.equal(a, b)


def test_phi3_longrope_long_factors_past_the_original_context(arch_dirs, arch_f32):
    """Phi-3.5's LongRoPE: past original_max_position_embeddings (256 here) transformers switches
    to the long factors, and llama.cpp does when its context is longer than that; a 300-token
    input gives the same logits both ways (the short factors are covered above)."""
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = arch_dirs("phi3")
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = tok(" ".join(wikitext_lines("test.txt", 60)))["input_ids"][:300]
    assert len(ids) == 300
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(arch_f32("phi3")), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                          n_threads=1, seed=0, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err < 1e-4, err
