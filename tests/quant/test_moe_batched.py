"""Batched GPTQ of many matrices of one shape (quant.gptq.quantize_weights) and the MoE stage
that uses it (quant.moe.quantize_experts): bit-identical to one solve per matrix, the starved
expert's safeguarded Hessian included; compact (bf16) expert parameters give the same stored
forms and block outputs as float32 ones."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from quantkit.quant import moe
from quantkit.quant.gptq import GPTQConfig, accumulate_hessian, new_hessian, quantize_weight, quantize_weights
from quantkit.quant.pipeline import PipelineConfig, decoder_layers, quantize_model
from quantkit.quant.rtn import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")

STARVED = 3          # the expert the biased router never picks
AXIS = 7             # the hidden coordinate the bias rides on


def _hessians(cols: int, tokens: list[int], gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(len(tokens), cols, cols)
    for e, n in enumerate(tokens):
        H = new_hessian(cols)
        accumulate_hessian(torch.randn(n, cols, generator=gen), H, 0)
        out[e] = H
    return out


def _same(a, b) -> None:
    assert torch.equal(a.dequantized, b.dequantized)
    assert torch.equal(a.weight.dequantize(), b.weight.dequantize())
    assert a.damp == b.damp and a.loss == b.loss


@pytest.mark.parametrize("grid, rows", [("q4_0", 128), ("q4_0", 40), ("q4_1", 64), ("q8_0", 64), ("q4_k", 64),
                                        (QuantSpec(bits=4, group_size=64), 64)])
def test_batch_equals_one_solve_per_matrix(grid, rows):
    """Each matrix of the batch gets exactly what quantize_weight gives it alone: codes, scales,
    values, damp and loss, for legacy, K-quant and integer grids, rows a multiple of the vector
    width (one fused update for the batch) or not (one per matrix). Hessians: plenty of tokens,
    fewer tokens than inputs (damp raised), one token, and a starved expert's safeguard
    (n H_e + m H̄) / (n + m)."""
    gen = torch.Generator().manual_seed(0)
    cols = 256
    H = _hessians(cols, [600, 40, 1, 300], gen)
    n, m = 2, 32
    H[3] = (H[2] * n + H[0] * m) / (n + m)
    W = torch.randn(4, rows, cols, generator=gen) * 0.02
    cfg = GPTQConfig(damp=0.0)                  # the singular Hessians (40 and 1 tokens) need damp raised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        batched = quantize_weights(W, H, grid, cfg)
        assert len(batched) == 4 and batched[0].damp == 0 and batched[1].damp > 0 and batched[2].damp > 0
        for e in range(4):
            _same(quantize_weight(W[e], H[e], grid, cfg), batched[e])


def test_batch_searches_on_one_thread_equal_the_serial_ones_on_two():
    """Rows enough for the serial solve to run its block searches on every thread (2048 x 32
    values): the batch, searching on one, gives the same results."""
    gen = torch.Generator().manual_seed(2)
    H = _hessians(64, [300, 20], gen)
    W = torch.randn(2, 2048, 64, generator=gen) * 0.02
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        serial = [quantize_weight(W[e], H[e], "q4_0") for e in range(2)]
        for a, b in zip(serial, quantize_weights(W, H, "q4_0")):
            _same(a, b)
    finally:
        torch.set_num_threads(n)


def test_unbatchable_grids_fall_back_to_one_solve_each():
    """act-order and the lattice types (a codebook entry for several columns) are solved one
    matrix at a time: the same results as quantize_weight."""
    gen = torch.Generator().manual_seed(1)
    H = _hessians(256, [400, 300], gen)
    W = torch.randn(2, 32, 256, generator=gen) * 0.02
    for grid, cfg in (("q4_0", GPTQConfig(act_order=True)), ("iq2_xxs", GPTQConfig())):
        for e, r in enumerate(quantize_weights(W, H, grid, cfg)):
            _same(quantize_weight(W[e], H[e], grid, cfg), r)
    with pytest.raises(ValueError, match="do not match"):
        quantize_weights(W, H[:1], "q4_0")


def _bf16_starved_copy(d: Path, out: Path) -> Path:
    """The tiny model with bf16-exact weights (as a bf16 checkpoint) and expert STARVED
    unreachable: every token embedding carries a large constant on coordinate AXIS, which the
    router reads with -1 for STARVED and +1 for the others."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(d, out)
    sd = load_file(str(out / "model.safetensors"))
    sd = {k: v.to(torch.bfloat16).float() for k, v in sd.items()}
    sd["model.embed_tokens.weight"][:, AXIS] = 50.0
    for name, w in sd.items():
        if name.endswith(".mlp.gate.weight"):
            w[:, AXIS] = 1.0
            w[STARVED, AXIS] = -1.0
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _run(d: Path, ids, batch: int, compact: bool, monkeypatch):
    """quantize_model on the tiny MoE with batches of `batch` experts; compact: the fused expert
    parameters in bf16 (as the streaming driver loads a bf16 checkpoint). Returns (model, report,
    stored forms, each MLP's inputs)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    _, layers, _ = decoder_layers(model)
    ex0 = layers[0].mlp.experts
    monkeypatch.setattr(moe, "EXPERT_BATCH_ELEMENTS", batch * ex0.down_proj[0].numel())
    seen: dict[int, list] = {i: [] for i in range(len(layers))}
    for i, layer in enumerate(layers):
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out.detach()))
        if compact:
            layer.mlp.experts.gate_up_proj.data = layer.mlp.experts.gate_up_proj.data.to(torch.bfloat16)
            layer.mlp.experts.down_proj.data = layer.mlp.experts.down_proj.data.to(torch.bfloat16)
    stored: dict = {}
    cfg = PipelineConfig(method="gptq", grid="q4_0", sparse_mlp=moe.quantize_experts)
    report = quantize_model(model, ids, cfg, on_block=lambda i, lp, layer, done: stored.update(done),
                            show_progress=False)
    xs = {i: torch.cat(v[-len(ids):]).reshape(-1, model.config.hidden_size) for i, v in seen.items()}
    return model, report, stored, xs


def test_moe_batches_and_compact_weights_change_nothing(arch_dirs, tmp_path, monkeypatch):
    """The tiny Qwen3-MoE (4 experts, one never routed to) quantized one expert per batch, all
    in one batch, and with compact bf16 parameters: the same stored bytes, report and block
    outputs. The starved expert is safeguarded, and its gate/up equals quantize_weight on the
    layer's pooled Hessian mixed in by hand (n = 0 tokens: (0 H_e + m H̄) / m)."""
    from transformers import AutoTokenizer
    from quantkit.quant.calib import calibration_ids
    d = _bf16_starved_copy(arch_dirs("qwen3moe"), tmp_path / "bf16")
    ids = calibration_ids(AutoTokenizer.from_pretrained(str(d)), None, 4, 64)
    from transformers import AutoModelForCausalLM
    original = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    runs = [_run(d, ids, b, c, monkeypatch) for b, c in ((1, False), (4, False), (3, True))]
    (_, ref, ref_stored, xs), others = runs[0], runs[1:]
    for model, report, stored, _ in others:
        assert report.experts == ref.experts and report.loss == ref.loss and report.damp == ref.damp
        assert stored.keys() == ref_stored.keys()
        for k in ref_stored:
            assert torch.equal(stored[k].to_bytes(), ref_stored[k].to_bytes()), k
        for a, b in zip(report.final_hidden, ref.final_hidden):
            assert torch.equal(a, b)
    _, layers, prefix = decoder_layers(original)
    for i, layer in enumerate(layers):
        r = ref.experts[f"{prefix}.{i}"]
        assert r["tokens"][STARVED] == 0 and STARVED in r["safeguarded"]
        m = r["min_tokens"]
        pooled = new_hessian(xs[i].shape[1])
        accumulate_hessian(xs[i], pooled, 0)
        mixed = (new_hessian(xs[i].shape[1]) * 0 + pooled * m) / (0 + m)
        W = layer.mlp.experts.gate_up_proj.data[STARVED]
        want = quantize_weight(W, mixed, "q4_0")
        got = torch.cat([ref_stored[f"{prefix}.{i}.mlp.experts.{p}"].parts[STARVED].to_bytes()
                         for p in ("gate_proj", "up_proj")])
        assert torch.equal(got, want.weight.to_bytes())


def test_expert_fetch_compact_only_when_lossless(arch_dirs, tmp_path):
    """expert_fetch(compact=True) stacks a bf16-exact checkpoint's experts in bf16 and keeps
    float32 for one whose values bf16 would round; without compact, float32 always."""
    from quantkit.models.open import open_model
    exact = _bf16_starved_copy(arch_dirs("qwen3moe"), tmp_path / "bf16")
    for d, want in ((exact, torch.bfloat16), (arch_dirs("qwen3moe"), torch.float32)):
        src = open_model(str(d))
        try:
            name = "model.layers.1.mlp.experts.gate_up_proj"
            t = moe.expert_fetch(src.load_hf, 4, compact=True)(name)
            f = moe.expert_fetch(src.load_hf, 4)(name)
            assert t.dtype == want and f.dtype == torch.float32 and t.shape == (4, 512, 256)
            assert torch.equal(t.float(), f)
        finally:
            src.close()
