"""Bytes of every tensor in a target format, from shapes alone.

GGUF: llama.cpp's per-tensor type choice for each file type ("mixes" such as Q4_K_M give some
tensors more bits) from quantkit.quant.gguf_policy, the same rules the GGUF writer uses
(llama.cpp src/llama-quant.cpp); sizes from the type table in quantkit.codecs.geometry.
int4 (ChatGLM-style weight-only RTN): packed 4-bit codes + one fp16 scale per output row.
GPTQ (AutoGPTQ / GPTQModel packing): qweight int32 [in*bits/32, out], qzeros int32
[groups, out*bits/32], scales fp16 [groups, out], g_idx int32 [in]; groups = ceil(in/group_size),
group_size -1 = one group. AWQ (GEMM packing) stores the same minus g_idx.
bitsandbytes: LLM.int8 = int8 weight + fp32 per-row scale; NF4 = 4-bit codes + one absmax per
64 weights, fp32, or with double quantization 8-bit absmax + one fp32 per 256 absmax.
Embeddings, the output head and norms stay 16-bit in the GPU formats (as those libraries do).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..codecs.geometry import type_geometry
from ..quant.gguf_policy import FILE_TYPES, ModelFacts, TypePolicy, allows_quantization, tensor_order
from ..util.errors import QuantkitError
from .model import ModelShape, Tensor

# llama.cpp file types -> the default tensor type of the mix (the GGUF writer's table)
GGUF_FTYPES = {name: default for name, (_, default) in FILE_TYPES.items()}
# IQ (importance-matrix) file types: sized as llama-quantize --imatrix makes them (the mix with
# an importance matrix, which the smallest of them require), as IQ_NOTE says.
IQ_FTYPES = {name: default for name, default in GGUF_FTYPES.items() if name.startswith("iq")}
IQ_NOTE = ("IQ file types are sized as llama-quantize --imatrix writes them (its per-tensor mix with an "
           "importance matrix; quantkit quantize --imatrix writes the same bytes)")

TORCH_DTYPES = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "f16": "f16", "f32": "f32"}

# HF checkpoint names -> GGUF names, enough to categorise tensors (llama, qwen2, gemma, phi, mistral)
_HF_MAP = [
    (r"(?:model\.)?embed_tokens\.weight$|transformer\.embedding\.word_embeddings\.weight$|model\.embed_tokens\.weight$", "token_embd.weight"),
    (r"^lm_head\.weight$|output_layer\.weight$", "output.weight"),
    (r"layers?\.(\d+)\.self_attn\.q_proj\.(weight|bias|qweight|qzeros|scales|g_idx)$", r"blk.\1.attn_q.\2"),
    (r"layers?\.(\d+)\.self_attn\.k_proj\.(weight|bias|qweight|qzeros|scales|g_idx)$", r"blk.\1.attn_k.\2"),
    (r"layers?\.(\d+)\.self_attn\.v_proj\.(weight|bias|qweight|qzeros|scales|g_idx)$", r"blk.\1.attn_v.\2"),
    (r"layers?\.(\d+)\.self_attn\.(?:o_proj|dense)\.(weight|bias|qweight|qzeros|scales|g_idx)$", r"blk.\1.attn_output.\2"),
    (r"layers?\.(\d+)\.(?:mlp|feed_forward)\.gate_proj\.(weight|bias|qweight|qzeros|scales|g_idx)$", r"blk.\1.ffn_gate.\2"),
    (r"layers?\.(\d+)\.(?:mlp\.up_proj|mlp\.fc1)\.(weight|bias|qweight|qzeros|scales|g_idx)$", r"blk.\1.ffn_up.\2"),
    (r"layers?\.(\d+)\.(?:mlp\.down_proj|mlp\.fc2)\.(weight|bias|qweight|qzeros|scales|g_idx)$", r"blk.\1.ffn_down.\2"),
    (r"layers?\.(\d+)\.block_sparse_moe\.gate\.weight$", r"blk.\1.ffn_gate_inp.weight"),
    (r"layers?\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.(weight|qweight|qzeros|scales|g_idx)$", r"blk.\1.ffn_gate.\2.\3"),
    (r"layers?\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.(weight|qweight|qzeros|scales|g_idx)$", r"blk.\1.ffn_up.\2.\3"),
    (r"layers?\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.(weight|qweight|qzeros|scales|g_idx)$", r"blk.\1.ffn_down.\2.\3"),
    (r"layers?\.(\d+)\.(.*norm.*)$", r"blk.\1.\2_norm"),
    (r"(?:model\.)?(?:norm|final_layernorm)\.(weight|bias)$", r"output_norm.\1"),
]


def canonical(name: str) -> str:
    if name.startswith(("blk.", "token_embd", "output")):
        return name
    for pat, rep in _HF_MAP:
        m = re.search(pat, name)
        if m:
            return m.expand(rep)
    return name


@dataclass(frozen=True)
class Format:
    name: str          # as shown: "q4_k_m", "gptq-4bit-128g", "int8", "nf4", "bf16"
    family: str        # "gguf" | "gptq" | "awq" | "int8" | "nf4" | "dense"
    bits: int = 16
    group_size: int = -1
    double_quant: bool = True
    act_order: bool = False

    @property
    def runtime(self) -> str:
        return "llama.cpp" if self.family == "gguf" else "torch"


def parse_format(s: str) -> Format:
    """A format name: a recipe of quantkit.recipe (gguf:q4_k_m or q4_k_m, gptq:w4g128, any
    +method: sizes do not depend on it), awq:w4g128, or a torch storage (fp16, bf16, int8 =
    LLM.int8, int4, nf4, nf4-nodq). The old gptq-4bit-128g / awq-4bit-128g are still read
    (quietly: model headers carry them; `quantkit plan` notes a user's old spelling)."""
    from ..recipe import FORMAT_BITS, SPEC_HELP, parse_weight_spec, split_recipe
    k = s.strip().lower()
    if k in GGUF_FTYPES:
        return Format(k, "gguf", bits=0)
    if k in TORCH_DTYPES:
        return Format({"f16": "fp16", "f32": "fp32"}.get(k, k), "dense", bits=16 if "16" in k else 32)
    head = k.split("+")[0]
    if head.removeprefix("gguf:") in IQ_FTYPES:      # any +method: sized the same
        return Format(head.removeprefix("gguf:"), "gguf", bits=0)
    if head in ("int4", "int4-rtn"):
        return Format("int4", "int4", bits=4)
    if head in ("int8", "llm.int8", "bnb-int8"):
        return Format("int8", "int8", bits=8)
    if head in ("nf4", "bnb-nf4", "nf4-dq"):
        return Format("nf4", "nf4", bits=4, double_quant=True)
    if head == "nf4-nodq":
        return Format("nf4-nodq", "nf4", bits=4, double_quant=False)
    m = re.fullmatch(r"awq[-_]?(\d+)bit(?:[-_](\d+|none)g)?", head)
    if m or head.startswith("awq:"):
        bits, g = ((int(m.group(1)), 128 if m.group(2) is None else (-1 if m.group(2) == "none" else int(m.group(2))))
                   if m else parse_weight_spec(head[4:], f"format '{s}'")[:2])
        if bits != 4:
            raise QuantkitError(f"format '{s}': AWQ kernels are 4-bit only", hint="awq:w4g128")
        return Format(k, "awq", bits=4, group_size=g)
    try:
        p = split_recipe(k)
    except QuantkitError as e:
        if ":" in head:                      # the format is known: the recipe's error names the part
            raise
        raise QuantkitError(f"unknown format '{s}'",
                            hint="GGUF: " + ", ".join(GGUF_FTYPES) + "; GPU: fp16, bf16, int8, nf4, gptq:SPEC, "
                                 f"awq:SPEC with SPEC {SPEC_HELP}") from None
    if p.format == "gguf":
        return Format(p.type, "gguf", bits=0)
    if p.format == "gptq":
        bits = 4 if p.bits is None else p.bits
        if bits not in FORMAT_BITS["gptq"]:
            raise QuantkitError(f"format '{s}': GPTQ bits must be 2, 3, 4 or 8")
        return Format(k, "gptq", bits=bits, group_size=128 if p.group_size is None else p.group_size,
                      act_order=bool(p.act_order))
    raise QuantkitError(f"format '{s}': plan does not size {p.format} yet",
                        hint="GGUF: gguf:TYPE; GPU: fp16, bf16, int8, nf4, gptq:SPEC, awq:SPEC")


# ---------------------------------------------------------------- llama.cpp mixes

def _quantizable(t: Tensor) -> bool:
    return allows_quantization(t.name, len(t.shape))


def gguf_types(m: ModelShape, ftype: str, tensors: list[Tensor] | None = None) -> dict[str, str]:
    """Tensor name -> GGUF type that `llama-quantize <ftype>` (default options; an importance
    matrix for the IQ file types, none for the others) picks, by quantkit.quant.gguf_policy
    (llama.cpp's rules, shared with the GGUF writer) [mix]."""
    if ftype not in GGUF_FTYPES:
        raise QuantkitError(f"unknown GGUF type '{ftype}'", hint="one of " + ", ".join(GGUF_FTYPES))
    tensors = [Tensor(canonical(t.name), t.shape, t.type, t.nbytes) for t in (tensors or m.tensors)]
    by_name = {t.name: t for t in tensors}
    order = tensor_order(list(by_name))
    facts = ModelFacts(m.arch, m.n_layer, m.n_head, m.n_head_kv, m.n_expert,
                       is_70b=m.arch == "llama" and m.n_layer == 80 and m.n_head_kv < m.n_head)
    policy = TypePolicy(ftype, order, facts, has_imatrix=ftype in IQ_FTYPES)
    out: dict[str, str] = {}
    for n in order:
        t = by_name[n]
        src = t.type if t.type in ("f32", "f16", "bf16") else "f32"
        if not _quantizable(t):
            # convert_hf_to_gguf writes 1D tensors and MoE routers in F32
            out[n] = "f32" if len(t.shape) < 2 or "ffn_gate_inp" in n else src
            continue
        out[n] = policy.choose(n, t.shape, src)
    return out


# ---------------------------------------------------------------- bytes per tensor

def gpu_linear(t: Tensor) -> bool:
    """A block linear the GPU formats quantize (not an embedding, the output head or a vector)."""
    n = canonical(t.name)
    return _quantizable(Tensor(n, t.shape, t.type, t.nbytes)) and n not in ("token_embd.weight", "output.weight")


def _gptq_bytes(out_f: int, in_f: int, f: Format, n_mat: int = 1) -> int:
    g = in_f if f.group_size == -1 else f.group_size
    groups = math.ceil(in_f / g)
    qweight = math.ceil(in_f * f.bits / 32) * out_f * 4
    qzeros = groups * math.ceil(out_f * f.bits / 32) * 4
    scales = groups * out_f * 2
    g_idx = in_f * 4 if f.family == "gptq" else 0
    return n_mat * (qweight + qzeros + scales + g_idx)


def _nf4_bytes(n: int, dq: bool) -> int:
    blocks = math.ceil(n / 64)
    codes = math.ceil(n / 2)
    if not dq:
        return codes + blocks * 4 + 16 * 4
    return codes + blocks + math.ceil(blocks / 256) * 4 + 4 + 16 * 4 + 256 * 4


def tensor_bytes(m: ModelShape, fmt: Format | str, tensors: list[Tensor] | None = None) -> list[Tensor]:
    """The model's tensors as they would be stored in `fmt` (names canonical where known)."""
    f = parse_format(fmt) if isinstance(fmt, str) else fmt
    src = [t for t in (tensors or unquantized_shapes(m))]
    out = []
    if f.family == "gguf":
        types = gguf_types(m, f.name, src)
        for t in src:
            n = canonical(t.name)
            ty = types[n]
            out.append(Tensor(n, t.shape, ty, type_geometry(ty).nbytes(t.shape)))
        return out
    dense = "bf16" if f.name == "bf16" else ("f32" if f.name == "fp32" else "f16")
    for t in src:
        n = canonical(t.name)
        if f.family == "dense" or not gpu_linear(t):
            out.append(Tensor(n, t.shape, dense, type_geometry(dense).nbytes(t.shape)))
            continue
        *lead, o, i = t.shape
        n_mat = math.prod(lead) if lead else 1
        if f.family in ("gptq", "awq"):
            b = _gptq_bytes(o, i, f, n_mat)
            ty = f.name
        elif f.family == "int8":
            b, ty = n_mat * (o * i + o * 4), "int8"
        elif f.family == "int4":      # per-output-channel RTN (ChatGLM's quantize(4)): packed + fp16 scale
            b, ty = n_mat * (math.ceil(o * i / 2) + o * 2), "int4"
        else:
            b, ty = _nf4_bytes(t.n_elements, f.double_quant), f.name
        out.append(Tensor(n, t.shape, ty, b))
    return out


def unquantized_shapes(m: ModelShape) -> list[Tensor]:
    """The logical (unpacked) tensors of a model; for GPTQ checkpoints qweight becomes [out, in]
    and its qzeros/scales/g_idx are dropped."""
    out = []
    bits = 4
    if m.stored_format and m.stored_format.startswith("gptq-"):
        bits = int(re.search(r"(\d+)bit", m.stored_format).group(1))
    for t in m.tensors:
        if t.name.endswith((".qzeros", ".scales", ".g_idx")):
            continue
        if t.name.endswith(".qweight"):
            rows, o = t.shape
            out.append(Tensor(t.name[:-len(".qweight")] + ".weight", (o, rows * 32 // bits), "f16", 0))
            continue
        out.append(t)
    return out


def total(ts: list[Tensor]) -> int:
    return sum(t.nbytes for t in ts)


def describe(f: Format) -> str:
    if f.family == "gguf":
        return f"GGUF {f.name.upper()} (llama.cpp mix)"
    if f.family in ("gptq", "awq"):
        g = "no groups" if f.group_size == -1 else f"group {f.group_size}"
        return f"{f.family.upper()} {f.bits}-bit, {g}"
    return {"int8": "bitsandbytes LLM.int8", "int4": "int4 per-channel RTN", "nf4": "bitsandbytes NF4 + double quant",
            "dense": f"{f.name} weights"}.get(f.family, f.name)
