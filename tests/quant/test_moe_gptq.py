"""GPTQ of mixtures of experts (quant.moe): routed calibration, starved experts, the
GPTQ-compensated Q4_0 GGUF of Qwen3-MoE and Mixtral in llama.cpp, per-expert imatrix counts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from quantkit import api
from quantkit.models.gguf import GGUFSource
from quantkit.models.imatrix_file import read_imatrix
from quantkit.quant.moe import quantize_experts
from quantkit.quant.pipeline import PipelineConfig, decoder_layers, quantize_model
from helpers.llama_logits import chunk_logits, greedy_tokens, kld
from helpers.tiny_models import starve_expert

pytestmark = pytest.mark.usefixtures("one_thread")

STARVED = 3          # the expert the biased router never picks
AXIS = 7             # the hidden coordinate the bias rides on


def _starved_copy(d: Path, out: Path) -> Path:
    """The model with expert STARVED unreachable (helpers.tiny_models.starve_expert on AXIS)."""
    return starve_expert(d, out, expert=STARVED, axis=AXIS)


def _calibration(d: Path, n: int, seqlen: int) -> torch.Tensor:
    from transformers import AutoTokenizer
    from quantkit.quant.calib import calibration_ids
    return calibration_ids(AutoTokenizer.from_pretrained(str(d)), None, n, seqlen)


def test_routed_counts_and_starved_expert(arch_dirs, tmp_path):
    """Per-expert token counts equal the router's own top-k on the MLP inputs the block saw; the
    expert no token reaches is safeguarded, reported, and still quantized onto Q4_0 (finite,
    the model's weight is exactly its stored form); the block outputs the pipeline propagates
    equal the quantized model's own forward (MoE output with the quantized experts)."""
    from transformers import AutoModelForCausalLM
    d = _starved_copy(arch_dirs("qwen3moe"), tmp_path / "starved")
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    _, layers, prefix = decoder_layers(model)
    k = model.config.num_experts_per_tok
    seen: dict[int, list] = {i: [] for i in range(len(layers))}
    for i, layer in enumerate(layers):
        # the last n inputs the MLP gets from its norm in each block are the routed calibration's
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out.detach()))
    ids = _calibration(d, 4, 64)
    before = [layer.mlp.experts.down_proj[STARVED].clone() for layer in layers]
    stored = {}
    cfg = PipelineConfig(method="gptq", grid="q4_0", sparse_mlp=quantize_experts)
    report = quantize_model(model, ids, cfg, on_block=lambda i, lp, layer, done: stored.update(done),
                            show_progress=False)
    assert list(report.experts) == [f"{prefix}.{i}" for i in range(len(layers))]
    for i, layer in enumerate(layers):
        x = torch.cat(seen[i][-len(ids):]).reshape(-1, model.config.hidden_size)
        probs = torch.softmax(x @ layer.mlp.gate.weight.t(), dim=-1)
        direct = torch.bincount(probs.topk(k, dim=-1).indices.reshape(-1), minlength=4).tolist()
        r = report.experts[f"{prefix}.{i}"]
        assert r["tokens"] == direct and sum(direct) == ids.numel() * k
        assert r["min_tokens"] == 32                       # max(16, hidden 256 // 8)
        assert direct[STARVED] == 0 and r["safeguarded"] == [e for e, c in enumerate(direct) if c < 32]
        assert STARVED in r["safeguarded"] and len(r["safeguarded"]) < 4
        for p, w in (("gate_proj", layer.mlp.experts.gate_up_proj[STARVED, :256]),
                     ("down_proj", layer.mlp.experts.down_proj[STARVED])):
            q = stored[f"{prefix}.{i}.mlp.experts.{p}"].parts[STARVED]
            assert torch.isfinite(w).all() and torch.equal(q.dequantize(), w)
        assert not torch.equal(before[i], layer.mlp.experts.down_proj[STARVED])
    # the hidden states the pipeline handed from block to block are the quantized model's own
    out = []
    layers[-1].register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for row in ids:
            model.model(input_ids=row[None], use_cache=False)
    for mine, theirs in zip(report.final_hidden, out):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


@pytest.mark.parametrize("kind", ["qwen3moe", "mixtral"])
def test_gptq_q4_0_gguf_beats_rtn(arch_dirs, tmp_path, kind, data_dir, capsys):
    """The GPTQ-compensated Q4_0 of a mixture of experts (through the CLI, one summary line per
    MoE layer) loads and generates in llama.cpp, the router stays F32 as llama-quantize keeps it,
    and its KL divergence to the F32 file on wikitext-2 test is below RTN Q4_0's."""
    from helpers.cli import run_cli
    d = arch_dirs(kind)
    f32, rtn, gq = tmp_path / "f32.gguf", tmp_path / "rtn.gguf", tmp_path / "gptq.gguf"
    api.quantize(str(d), f32, format="gguf:f32", show_progress=False)
    api.quantize(str(d), rtn, format="gguf:q4_0", show_progress=False)
    code = run_cli(["quantize", str(d), "--method", "gptq", "--format", "gguf:q4_0", "--nsamples", "16",
                    "--seqlen", "128", "-o", str(gq)], capsys)[0]
    assert code == 0
    with GGUFSource(gq) as a, GGUFSource(rtn) as b:
        assert [(t.name, t.type, t.shape) for t in a.tensors()] == [(t.name, t.type, t.shape) for t in b.tensors()]
        assert a.tensor_info("blk.0.ffn_gate_inp.weight").type == "f32"
        assert a.tensor_info("blk.0.ffn_down_exps.weight").type == "q4_0"
        assert not np.array_equal(np.asarray(a.raw("blk.1.ffn_up_exps.weight")[0]),
                                  np.asarray(b.raw("blk.1.ffn_up_exps.weight")[0]))
    text = (Path(data_dir) / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:20000]
    ref = chunk_logits(f32, text)
    k_rtn, k_gptq = kld(ref, chunk_logits(rtn, text)), kld(ref, chunk_logits(gq, text))
    assert k_gptq < k_rtn, (k_gptq, k_rtn)
    assert len(greedy_tokens(gq)) == 6


def test_cli_summary_line_per_layer(arch_dirs, tmp_path, capsys):
    """The CLI prints one line per MoE layer with the spread of token counts and the
    safeguarded experts."""
    d = _starved_copy(arch_dirs("mixtral"), tmp_path / "starved")
    out = _run_stdout(["quantize", str(d), "--method", "gptq", "--format", "gguf:q4_0", "--nsamples", "2",
                       "--seqlen", "64", "-o", str(tmp_path / "a.gguf")], capsys)
    lines = [line for line in out.splitlines() if "4 experts, tokens per expert min 0 / median" in line]
    assert [line.split(":")[0] for line in lines] == ["model.layers.0", "model.layers.1"], out
    for line in lines:
        m = re.search(r"(\d+) under 32 tokens safeguarded \(([\d, ]+)\)$", line)
        assert m and str(STARVED) in m.group(2).split(", ") and int(m.group(1)) == len(m.group(2).split(", "))


def _run_stdout(args, capsys) -> str:
    from quantkit.cli import main
    assert main(args) == 0
    return capsys.readouterr().out


def test_imatrix_records_per_expert_counts(arch_dirs, tmp_path):
    """quantkit imatrix on a mixture of experts: each *_exps tensor has one row of sums and one
    token count per expert (as llama-imatrix's MUL_MAT_ID path), the counts summing to top_k x
    tokens; the starved expert's count is 0; the router's entry has every token's input (each
    token reaches 2 experts, so its sums are half the experts' gate sums added up)."""
    d = _starved_copy(arch_dirs("qwen3moe"), tmp_path / "starved")
    out = tmp_path / "imatrix.gguf"
    api.imatrix(str(d), out, nsamples=2, seqlen=64, show_progress=False)
    imx = read_imatrix(out)
    for layer in (0, 1):
        for part in ("gate", "up", "down"):
            e = imx.entries[f"blk.{layer}.ffn_{part}_exps.weight"]
            assert e.sums.shape == (4, 256) and e.counts.shape == (4,)
            assert e.counts.sum() == 2 * 64 * 2 and e.counts[STARVED] == 0
            assert ((e.sums > 0).all(axis=1) == (e.counts > 0)).all() and (e.sums[STARVED] == 0).all()
        assert imx.entries[f"blk.{layer}.attn_q.weight"].counts.tolist() == [128.0]
        router = imx.entries[f"blk.{layer}.ffn_gate_inp.weight"]      # the router's input: every token's
        assert router.counts.tolist() == [128.0]
        assert np.allclose(router.sums[0], imx.entries[f"blk.{layer}.ffn_gate_exps.weight"].sums.sum(0) / 2,
                           rtol=1e-5)


def test_plan_counts_all_experts_for_memory_and_active_ones_for_speed(arch_dirs):
    """From config.json alone: memory holds every expert's bytes, a decoding step reads
    n_expert_used of n_expert experts' bytes."""
    import json
    from quantkit.plan import formats, speed
    from quantkit.plan.model import build_tensors, from_hf_config
    d = arch_dirs("qwen3moe")
    m = from_hf_config(json.loads((d / "config.json").read_text()), "qwen3moe")
    assert (m.n_expert, m.n_expert_used) == (4, 2)
    ts = formats.tensor_bytes(m, "q4_0", build_tensors(m, "f32"))
    exps = sum(t.nbytes for t in ts if "_exps." in t.name)
    assert exps == 2 * 3 * 4 * 256 * 256 // 32 * 18          # 2 layers x 3 tensors x 4 experts, Q4_0 blocks
    embd = next(t for t in ts if t.name == "token_embd.weight")
    per_token = formats.total(ts) - exps + exps * 2 / 4 - embd.nbytes + embd.nbytes / embd.shape[0]
    assert speed.weight_bytes_per_token(m, ts) == pytest.approx(per_token, rel=1e-12)


def test_imatrix_from_moe_gptq_is_one_line(arch_dirs, tmp_path, capsys):
    """An importance matrix saved from GPTQ of a mixture of experts is refused in one line that
    says what to do instead, with nothing written (GPTQ from an MoE GGUF: test_moe_gguf_source.py)."""
    from helpers.cli import assert_one_line, no_partial, run_cli
    d = arch_dirs("mixtral")
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()                 # the fixture's own output, if it built the model just now
    code, err = run_cli(["quantize", str(d), "--format", "gguf:q4_0", "--method", "gptq", "--nsamples", "2",
                         "--seqlen", "64", "--save-imatrix", str(out / "imx.gguf"), "-o", str(out / "y.gguf")], capsys)
    assert code != 0
    assert_one_line(err, "dense linears only", "quantkit imatrix")
    assert no_partial(out) and not (out / "y.gguf").exists() and not (out / "imx.gguf").exists()
