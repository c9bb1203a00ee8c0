"""A GGUF's tensors by their Hugging Face names, and the transformers model they fill: the
reading half of the GGUF -> Hugging Face export (models.hf_export), for the torch runtime
(runtimes.torch.model_from_gguf) and block-wise GPTQ from a GGUF (quant.streaming).

The config is hf_export_config.hf_config's (every architecture of arch.HF_ARCHS transformers
has), the values go through hf_export.to_hf_values (llama's q/k rows permuted back, Gemma's
1 + w norms shifted back), and a name is looked up through the HF -> GGUF direction's own map
(arch.hf_to_gguf_name). Three kinds of name are answered:

- a parameter of the model or of its checkpoint: the whole GGUF tensor, in Hugging Face's values;
- one expert's matrix as checkpoints store it (`mlp.experts.{e}.gate_proj.weight`, Mixtral's
  `block_sparse_moe.experts.{e}.w1.weight`): only that expert's rows of the stacked
  [n_expert, rows, cols] GGUF tensor are read (hf_export.expert_rows);
- (fused=True) transformers' fused expert parameters, `mlp.experts.gate_up_proj`
  [n_expert, 2 x inter, hidden] (gate rows first) and `mlp.experts.down_proj`, from the
  layer's ffn_{gate,up,down}_exps tensors, for a whole-model load.
"""

from __future__ import annotations

import re

import torch
from gguf import MODEL_TENSOR, TENSOR_NAMES

from ..util.errors import QuantkitError
from .arch import HFArch, expert_index, hf_to_gguf_name
from .gguf import GGUFSource
from .hf_export import Piece, expert_rows, plan_tensors, to_hf_values
from .hf_export_config import export_archs, export_row, hf_config, transformers_class

_FUSED = re.compile(r"^.*\blayers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_FUSED_PARTS = {"gate_up_proj": (MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP),
                "down_proj": (MODEL_TENSOR.FFN_DOWN_EXP,)}


def supported_architectures() -> list[str]:
    """llama.cpp architectures a GGUF of which becomes a transformers model here."""
    return sorted(export_archs())


def gguf_model_config(src: GGUFSource) -> tuple[HFArch, object]:
    """(HF_ARCHS row, transformers config) of a GGUF, checked against transformers' tensors
    (hf_export.plan_tensors: every tensor on both sides, equal shapes); one-line QuantkitError
    naming an architecture outside the list and the supported ones."""
    try:
        arch = export_row(src)
    except QuantkitError:
        experts = f" with {src.spec.n_expert} experts" if src.spec.n_expert else ""
        raise QuantkitError(f"a GGUF of architecture '{src.spec.arch}'{experts} is not rebuilt in transformers "
                            "(the torch runtime, GPTQ from a GGUF)", src.path,
                            f"supported: {', '.join(supported_architectures())}; run the file in llama.cpp, "
                            "or quantize it with --method rtn") from None
    cfg = hf_config(src, arch)
    plan_tensors(src, arch, cfg)
    return arch, cfg


def empty_model(cfg):
    """The transformers model of `cfg` in float32, eager attention, its parameters allocated and
    not initialised (untouched pages: no memory until written)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    cfg._attn_implementation = "eager"
    with no_init_weights():
        return transformers_class(cfg.architectures[0])(cfg).float().eval()


def hf_tensor_reader(src: GGUFSource, arch: HFArch, copy: bool = True, fused: bool = False):
    """read(hf_name) -> the float32 tensor of a Hugging Face name from the GGUF (module
    docstring), or None for a name the file has no tensor for. copy: a fresh tensor, never a
    view of the file's map (whose pages are released again). fused: also answer the fused
    expert parameters (the whole layer's experts)."""
    names = {t.name for t in src.tensors()}

    def read(hf_name: str) -> torch.Tensor | None:
        if fused and (m := _FUSED.match(hf_name)) is not None:
            return _fused(src, names, int(m.group(1)), m.group(2))
        try:
            g = hf_to_gguf_name(arch, hf_name)
        except KeyError:
            return None
        if g is None or g not in names:
            return None
        e = expert_index(hf_name)
        if e is not None:
            info = src.tensor_info(g)
            return expert_rows(src, g, e, 0, info.shape[1]) if e < info.shape[0] else None
        t = to_hf_values(arch, src, Piece(hf_name, g, ()), src.load(g))
        if copy:
            t = t.clone()
            src.release(g)
        return t
    return read


def _fused(src: GGUFSource, names: set[str], layer: int, what: str) -> torch.Tensor | None:
    gs = [TENSOR_NAMES[k].format(bid=layer) + ".weight" for k in _FUSED_PARTS[what]]
    if not all(g in names for g in gs):
        return None
    out = torch.cat([src.load(g) for g in gs], dim=1)
    for g in gs:
        src.release(g)
    return out
