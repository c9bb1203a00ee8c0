"""Quantized checkpoints quantkit does not write itself, built from a float HF directory for the
converter's tests: AutoAWQ's GEMM layout, compressed-tensors FP8, GPTQ v2 zero points and a
desc_act checkpoint whose groups are permuted across the columns."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]        # AutoAWQ: nibble i of a word holds column order_map[i]


def _copy_base(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    dst.mkdir()
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and f != "config.json":
            shutil.copy(src / f, dst / f)
    sd = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            sd.update(load_file(str(src / f)))
    return sd


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEAR_SUFFIXES


def _rtn_asym(w: torch.Tensor, gs: int, bits: int = 4):
    """w [out, in] -> codes [out, in], scales fp16 [out, groups], zeros int [out, groups]."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // gs, gs)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    s = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-8).half()
    z = torch.round(-lo / s.float()).clamp(0, 2 ** bits - 1).int()
    q = torch.clamp(torch.round(g / s.float()[..., None]) + z[..., None], 0, 2 ** bits - 1).int()
    return q.reshape(out_f, in_f), s, z


def awq_pack_gemm(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ's WQLinear_GEMM pack loop: int [rows, cols] 4-bit -> int32 [rows, cols/8]."""
    rows, cols = intweight.shape
    packed = np.zeros((rows, cols // 8), dtype=np.uint32)
    for col in range(cols // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AWQ_ORDER_MAP[i]].astype(np.uint32) << np.uint32(i * 4)
    return packed.view(np.int32)


def write_awq(src: Path, dst: Path, group_size: int = 32) -> dict[str, torch.Tensor]:
    """An AWQ GEMM checkpoint (qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16
    [in/g, out]) of the float HF model in `src`; returns the dequantized weights per linear prefix."""
    sd = _copy_base(src, dst)
    out, deq = {}, {}
    for name, t in sd.items():
        if not _is_linear(name):
            out[name] = t.half()
            continue
        p = name[:-7]
        q, s, z = _rtn_asym(t.float(), group_size)
        out[p + ".qweight"] = torch.from_numpy(awq_pack_gemm(q.t().contiguous().numpy()))
        out[p + ".qzeros"] = torch.from_numpy(awq_pack_gemm(z.t().contiguous().numpy()))
        out[p + ".scales"] = s.t().contiguous()
        g = torch.arange(t.shape[1]) // group_size
        deq[p] = (q - z[:, g]).float() * s.float()[:, g]
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(src / "config.json"))
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": None}
    cfg["torch_dtype"] = "float16"
    json.dump(cfg, open(dst / "config.json", "w"), indent=2)
    return deq


def write_fp8(src: Path, dst: Path, block: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """A compressed-tensors float-quantized (FP8 E4M3) checkpoint: channel scales [out, 1], or
    block scales [out/bo, in/bi] (max |w| / 448 per scale); returns the dequantized weights."""
    sd = _copy_base(src, dst)
    out, deq = {}, {}
    for name, t in sd.items():
        if not _is_linear(name):
            out[name] = t.bfloat16()
            continue
        w = t.float()
        if block is None:
            s = w.abs().amax(1, keepdim=True) / 448
            full = s
        else:
            bo, bi = block
            s = w.reshape(w.shape[0] // bo, bo, w.shape[1] // bi, bi).abs().amax((1, 3)) / 448
            full = s.repeat_interleave(bo, 0).repeat_interleave(bi, 1)
        f8 = (w / full).to(torch.float8_e4m3fn)
        out[name] = f8
        out[name[:-7] + ".weight_scale"] = s
        deq[name[:-7]] = f8.float() * full
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
               "strategy": "channel" if block is None else "block", "group_size": None}
    if block is not None:
        weights["block_structure"] = list(block)
    cfg = json.load(open(src / "config.json"))
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                  "quantization_status": "compressed", "ignore": ["lm_head"],
                                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                                "format": "float-quantized"}}}
    cfg["torch_dtype"] = "bfloat16"
    json.dump(cfg, open(dst / "config.json", "w"), indent=2)
    return deq


def rewrite_gptq(src: Path, dst: Path, *, v2: bool = False, permute_groups: bool = False,
                 config_edit: dict | None = None, drop: str | None = None) -> None:
    """A copy of a quantkit GPTQ (v1) checkpoint: v2 zero points (qzeros + 1 and
    checkpoint_format gptq_v2), or g_idx permuted across the columns (desc_act without static
    groups), or config keys changed, or a tensor dropped (bad input)."""
    shutil.copytree(src, dst)
    files = [f for f in os.listdir(dst) if f.endswith(".safetensors")]
    from quantkit.codecs.intpack import pack_int32, unpack_int32
    bits = json.load(open(dst / "config.json"))["quantization_config"]["bits"]
    for f in files:
        sd = load_file(str(dst / f))
        for name in list(sd):
            if v2 and name.endswith(".qzeros"):
                out_f = sd[name[:-7] + ".scales"].shape[1]
                sd[name] = pack_int32(unpack_int32(sd[name], bits, out_f, dim=1) + 1, bits, dim=1)
            if permute_groups and name.endswith(".g_idx"):
                g = sd[name]
                perm = torch.randperm(g.numel(), generator=torch.Generator().manual_seed(g.numel()))
                sd[name] = g[perm].contiguous()
            if drop and name.endswith(drop):
                del sd[name]
        save_file(sd, str(dst / f), metadata={"format": "pt"})
    for cfg_name in ("config.json", "quantize_config.json"):
        path = dst / cfg_name
        if not path.exists():
            continue
        cfg = json.load(open(path))
        qc = cfg["quantization_config"] if cfg_name == "config.json" else cfg
        if v2:
            qc["checkpoint_format"] = "gptq_v2"
        if permute_groups:
            qc["desc_act"] = True
            qc["static_groups"] = False
        qc.update(config_edit or {})
        json.dump(cfg, open(path, "w"), indent=2)


def checkpoint_tensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (all its shards), by name."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def fixed_ids(model) -> torch.Tensor:
    """2 x 24 token ids, the same every run, within the model's vocabulary (and under 700)."""
    return torch.randint(0, min(model.config.vocab_size, 700), (2, 24), generator=torch.Generator().manual_seed(3))


def assert_loads_as_quantized(theirs, ours, ref, rtol: float = 1e-5, label: str = "") -> None:
    """`theirs` (a runtime's load of a checkpoint) gives `ours`' logits (quantkit's dequantized
    model) within rtol of max |logit|, and `ours` is not the float model `ref`."""
    ids = fixed_ids(ours)
    with torch.no_grad():
        a, b, f = (m(input_ids=ids).logits for m in (theirs, ours, ref))
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= rtol * scale, (label, float((a - b).abs().max()) / scale)
    assert float((b - f).abs().max()) > 1e-3 * scale, label      # quantized: not the float model
