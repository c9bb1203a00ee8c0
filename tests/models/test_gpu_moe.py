"""GPU checkpoints of mixtures of experts (Qwen3-MoE, Mixtral): the tiny random models of the
`arch_dirs` fixture (hidden 256, 2 layers, 4 experts, 2 per token) quantized to 4 bits in
groups of 32 and written as GPTQ and compressed-tensors checkpoints.

Layout: one linear per expert under the names transformers' save_pretrained gives the float
model (the source directory's own names: `mlp.experts.{e}.gate_proj`, Mixtral's
`block_sparse_moe.experts.{e}.w1`), the router unquantized. transformers 5 loads the
compressed-tensors checkpoint with compressed-tensors running the attention linears from their
packed codes and its MoE conversion dequantizing each expert before merging them into its fused
parameters; its logits equal quantkit's own dequantized model (the float model with every
quantized matrix replaced by its dequantized values) within 1e-5 of max |logit|: the same
float32 weights, only the order of float32 sums differs (measured <= 1e-6). transformers reads
GPTQ-format checkpoints only through optimum + gptqmodel (not installed): the GPTQ directory is
decoded with quantkit's v1 unpacker, and the decoded per-expert weights, loaded by transformers
from their checkpoint names, rebuild exactly quantkit's fused experts."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.models.gpu_formats import GPUFormatConfig, dequantize_compressed, dequantize_gptq
from quantkit.quant.checkpoint import export_gpu_checkpoint, grid_spec
from quantkit.quant.rtn import quantize_rtn
from helpers.cli import assert_one_line, run_cli
from helpers.tiny_models import starve_expert
from helpers.quantized_ckpt import assert_loads_as_quantized, checkpoint_tensors, fixed_ids

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["qwen3moe", "mixtral"]
BITS, GROUP = 4, 32
LOGIT_RTOL = 1e-5
NSAMPLES, SEQLEN = 4, 64
STARVED = 3
ROUTER = {"qwen3moe": "mlp.gate", "mixtral": "block_sparse_moe.gate"}
PACKED = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point")
GPTQ_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


@pytest.fixture(scope="module")
def exported(arch_dirs, tmp_path_factory):
    """kind -> (model dir, {format: GPUExportResult}) by GPTQ, built once per architecture;
    each result keeps quantkit's dequantized model."""
    root = tmp_path_factory.mktemp("gpu-moe")
    done: dict[str, tuple[Path, dict]] = {}

    def get(kind: str):
        if kind not in done:
            d = arch_dirs(kind)
            done[kind] = d, {fmt: export_gpu_checkpoint(str(d), str(root / f"{kind}-{fmt}"),
                                                        GPUFormatConfig(fmt, bits=BITS, group_size=GROUP),
                                                        nsamples=NSAMPLES, seqlen=SEQLEN, keep_model=True,
                                                        show_progress=False)
                             for fmt in ("compressed-tensors", "gptq")}
        return done[kind]

    return get


def _experts(model, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    ex = model.model.layers[i].mlp.experts
    return ex.gate_up_proj, ex.down_proj


def _expert_weight(model, i: int, e: int, part: str) -> torch.Tensor:
    """Expert e's matrix `part` in block i, from the fused parameters (gate rows first)."""
    gu, dn = _experts(model, i)
    inter = gu.shape[1] // 2
    return {"gate": gu[e, :inter], "up": gu[e, inter:], "down": dn[e]}[part]


def _part_of(kind: str, name: str) -> tuple[int, int, str]:
    """(block, expert, gate|up|down) of a per-expert checkpoint prefix."""
    i, e, p = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)", name).groups()
    return int(i), int(e), {"gate_proj": "gate", "up_proj": "up", "down_proj": "down",
                            "w1": "gate", "w3": "up", "w2": "down"}[p]


def _source_names(d: Path) -> set[str]:
    return set(load_file(d / "model.safetensors"))


@pytest.mark.parametrize("kind", KINDS)
def test_compressed_tensors_moe_loads_with_dequantized_logits(exported, kind):
    from transformers import AutoModelForCausalLM
    d, res = exported(kind)
    r = res["compressed-tensors"]
    out, ours = Path(r.output), r.model.eval()
    qc = json.load(open(out / "config.json"))["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head", f"re:.*{ROUTER[kind]}$"]
    t = checkpoint_tensors(out)
    # the float source's tensor names, each quantized linear's .weight replaced by its packed tensors
    packed = {k.removesuffix(".weight_packed") for k in t if k.endswith(".weight_packed")}
    assert {k for k in t if not k.endswith(PACKED)} | {p + ".weight" for p in packed} == _source_names(d)
    experts = sorted(p for p in packed if ".experts." in p)
    assert len(experts) == 2 * 4 * 3 and r.n_linear == len(packed) == 2 * (4 + 4 * 3)
    for p in experts:                    # every expert decodes to quantkit's own
        i, e, part = _part_of(kind, p)
        assert torch.equal(dequantize_compressed(t, p, BITS, GROUP), _expert_weight(ours, i, e, part)), p
    for i in (0, 1):                     # the router unquantized, as in the source
        assert torch.equal(t[f"model.layers.{i}.{ROUTER[kind]}.weight"], ours.model.layers[i].mlp.gate.weight)

    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert hasattr(theirs.get_submodule("model.layers.0.self_attn.q_proj"), "weight_packed")
    for i in (0, 1):                     # the experts transformers dequantized and merged are quantkit's
        for a, b in zip(_experts(theirs, i), _experts(ours, i)):
            assert torch.equal(a, b)
    assert_loads_as_quantized(theirs, ours, ref, LOGIT_RTOL, kind)
    # GPTQ calibrated each expert on the tokens the router sent it: every token reaches top_k experts
    assert sorted(r.report.experts) == ["model.layers.0", "model.layers.1"]
    for rep in r.report.experts.values():
        assert len(rep["tokens"]) == 4 and sum(rep["tokens"]) == NSAMPLES * SEQLEN * 2


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_moe_checkpoint_holds_the_dequantized_model(exported, kind, tmp_path):
    """Every expert decodes exactly to quantkit's; every other tensor is quantkit's in fp16; and
    the decoded weights, saved under the checkpoint's names, load in transformers (its MoE
    conversion merging the per-expert tensors) into exactly quantkit's fused experts."""
    from transformers import AutoModelForCausalLM
    d, res = exported(kind)
    r = res["gptq"]
    out, ours = Path(r.output), r.model
    cfg = json.load(open(out / "config.json"))
    assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["torch_dtype"] == "float16"
    t = checkpoint_tensors(out)
    linears = {k.removesuffix(".qweight") for k in t if k.endswith(".qweight")}
    assert {k for k in t if not k.endswith(GPTQ_PARTS)} | {p + ".weight" for p in linears} == _source_names(d)
    assert r.n_linear == len(linears) == 2 * (4 + 4 * 3)
    dense = {p + ".weight": dequantize_gptq(t, p, BITS) for p in linears}
    for p in linears:
        if ".experts." in p:
            i, e, part = _part_of(kind, p)
            assert torch.equal(dense[p + ".weight"], _expert_weight(ours, i, e, part)), p
        else:
            assert torch.equal(dense[p + ".weight"], ours.get_submodule(p).weight), p
    dense.update({k: v.float() for k, v in t.items() if not k.endswith(GPTQ_PARTS)})
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    save_file(dense, str(rebuilt / "model.safetensors"), metadata={"format": "pt"})
    cfg.pop("quantization_config")
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (rebuilt / "config.json").write_text(json.dumps(cfg))
    theirs = AutoModelForCausalLM.from_pretrained(rebuilt, dtype=torch.float32)
    for i in (0, 1):
        for a, b in zip(_experts(theirs, i), _experts(ours, i)):
            assert torch.equal(a, b)
        router = ours.model.layers[i].mlp.gate.weight
        assert torch.equal(theirs.model.layers[i].mlp.gate.weight, router.half().float())


@pytest.mark.parametrize("kind", KINDS)
def test_rtn_moe_through_the_cli_equals_rounding_each_matrix(arch_dirs, kind, tmp_path, capsys):
    """`quantize --format compressed-tensors:w4g32+rtn`: transformers' model from the checkpoint
    gives the logits of the float model with every decoder linear and every expert's gate, up
    and down rounded to nearest on their own (quantkit's RTN, applied here to the float weights)."""
    from transformers import AutoModelForCausalLM
    d = arch_dirs(kind)
    out = tmp_path / "ckpt"
    code, err = run_cli(["quantize", str(d), "--format", f"compressed-tensors:w{BITS}g{GROUP}+rtn", "-o", str(out)],
                        capsys)
    assert code == 0, err
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expect = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    spec = grid_spec("compressed-tensors", BITS, GROUP, True, torch.float32)
    with torch.no_grad():
        for layer in expect.model.layers:
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(quantize_rtn(m.weight, spec).dequantize())
            gu, dn = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj
            inter = gu.shape[1] // 2
            for e in range(gu.shape[0]):
                for w in (gu[e, :inter], gu[e, inter:], dn[e]):
                    w.copy_(quantize_rtn(w, spec).dequantize())
        ids = fixed_ids(expect)
        a, b = theirs(input_ids=ids).logits, expect(input_ids=ids).logits
    assert float((a - b).abs().max()) <= LOGIT_RTOL * float(b.abs().max())
    for i in (0, 1):
        for x, y in zip(_experts(theirs, i), _experts(expect, i)):
            assert torch.equal(x, y)


def test_starved_expert_safeguarded_and_reported(arch_dirs, tmp_path, capsys):
    """GPTQ to a GPU format of a Mixtral whose router never picks expert STARVED: one CLI line
    per MoE layer names it among the safeguarded experts (and --json carries the counts); its
    matrices are still written, finite, and decode to quantkit's model."""
    from quantkit.cli import main
    d = starve_expert(arch_dirs("mixtral"), tmp_path / "starved", STARVED)
    out = tmp_path / "ckpt"
    capsys.readouterr()
    assert main(["quantize", str(d), "--format", f"gptq:w{BITS}g{GROUP}", "--method", "gptq", "--nsamples", "2",
                 "--seqlen", "64", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if "4 experts, tokens per expert min 0 / median" in line]
    assert [line.split(":")[0] for line in lines] == ["model.layers.0", "model.layers.1"], text
    for line in lines:
        m = re.search(r"(\d+) under 32 tokens safeguarded \(([\d, ]+)\)$", line)
        assert m and str(STARVED) in m.group(2).split(", ") and int(m.group(1)) == len(m.group(2).split(", "))
    t = checkpoint_tensors(out)
    for i in (0, 1):
        for w in ("w1", "w3", "w2"):
            deq = dequantize_gptq(t, f"model.layers.{i}.block_sparse_moe.experts.{STARVED}.{w}", BITS)
            assert torch.isfinite(deq).all() and deq.abs().max() > 0
    assert main(["quantize", str(d), "--format", f"compressed-tensors:w{BITS}g{GROUP}", "--method", "gptq",
                 "--nsamples", "2", "--seqlen", "64", "--json", "-o", str(tmp_path / "ct")]) == 0
    summary = json.loads(capsys.readouterr().out)
    for rep in summary["experts"].values():
        assert rep["tokens"][STARVED] == 0 and STARVED in rep["safeguarded"] and rep["min_tokens"] == 32


def test_asymmetric_compressed_tensors_moe_is_one_line(arch_dirs, tmp_path, capsys):
    """compressed-tensors with zero points of a mixture of experts is refused (transformers
    dequantizes each expert without its zero point), before any work, with nothing written."""
    d, out = arch_dirs("qwen3moe"), tmp_path / "ckpt"
    capsys.readouterr()                 # the fixture's own output, if it built the model just now
    code, err = run_cli(["quantize", str(d), "--format", "compressed-tensors:w4g32-asym+rtn",
                         "-o", str(out)], capsys)
    assert code != 0
    assert_one_line(err, "compressed-tensors with zero points", "mixture of experts", "gptq:w4g128-asym")
    assert os.listdir(tmp_path) == []


def test_gpu_format_from_an_moe_gguf_equals_the_hf_directory_s(arch_dirs, arch_f32, tmp_path, capsys):
    """A GGUF of a mixture of experts is rebuilt block by block in transformers (its experts read
    from the stacked GGUF tensors): the compressed-tensors checkpoint from Mixtral's F32 GGUF
    holds the same tensors, by the same names, as the one from its Hugging Face directory."""
    f32 = arch_f32("mixtral")
    capsys.readouterr()
    a, b = tmp_path / "from-gguf", tmp_path / "from-hf"
    for src, out in ((f32, a), (arch_dirs("mixtral"), b)):
        code, err = run_cli(["quantize", str(src), "--format", "compressed-tensors:w4g32+rtn", "-o", str(out)], capsys)
        assert code == 0, err
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert sorted(ta) == sorted(tb) and "model.layers.1.block_sparse_moe.experts.3.w2.weight_packed" in ta
    assert [n for n in ta if not torch.equal(ta[n], tb[n])] == []
