"""Decode model names and tags: "Llama-2-13B-chat-GPTQ", "pygmalion-13b-4bit-128g", ...

What a name says, field by field: parameter count ("13B", "7b", "8x7B"), method (GPTQ, AWQ,
GGML, GGUF, EXL2, int4/int8, fp16...), bits, group size ("128g"; absent = -1, one group per
row), act-order, GGML/GGUF tensor type (q4_0, Q4_K_M, IQ3_XS...), file format and runtime.
Fields the name leaves open but a convention fixes (TheBloke's GPTQ main branch is 4-bit,
group 128) are filled and listed in `assumed`. Where the base model is in the built-in table
the sizes are exact for that config; otherwise they come from the parameter count in the name.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ..codecs.geometry import GEOMETRIES, type_geometry
from ..util import validate as v
from ..util.errors import QuantkitError
from . import formats, memory
from .model import alias_map, from_name, normalize_name

_QTYPE_RE = re.compile(r"(?<![a-z0-9])(iq[1-4]_(?:xxs|xs|s|m|nl)|q[2-8]_k(?:_[sml])?|q[4-8]_[01]|q[2-8]_k|f16|f32|bf16)(?![a-z0-9])")
_SIZE_RE = re.compile(r"(?<![a-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])(?![a-z0-9])")
_GROUP_RE = re.compile(r"(?<![a-z0-9])(\d+)g(?![a-z0-9])")
_BITS_RE = re.compile(r"(?<![a-z0-9])(\d+)[-_]?bits?(?![a-z0-9])")

RUNTIME = {
    "gptq": "GPU: transformers + GPTQModel/AutoGPTQ, ExLlama, vLLM (CUDA/ROCm)",
    "awq": "GPU: transformers + AutoAWQ, vLLM (CUDA/ROCm)",
    "exl2": "GPU: ExLlamaV2 (CUDA/ROCm)",
    "ggml": "CPU (+ partial GPU offload): llama.cpp before August 2023; current llama.cpp needs GGUF (convert it)",
    "gguf": "CPU or GPU (partial offload): llama.cpp, Ollama, LM Studio",
    "dense": "GPU (or slow CPU): transformers, vLLM; llama.cpp after conversion to GGUF",
    "int4": "GPU or CPU: transformers with trust_remote_code (the model's own quantization kernels)",
    "int8": "GPU: transformers + bitsandbytes (LLM.int8)",
    "nf4": "GPU: transformers + bitsandbytes (load_in_4bit)",
}


@dataclass
class NameInfo:
    name: str
    base_model: str | None = None          # built-in config the name maps to
    params: int | None = None              # parameter count
    params_from: str | None = None         # "config" or "name"
    experts: int | None = None
    chat: bool = False
    method: str | None = None              # gptq, awq, exl2, ggml, gguf, int4, int8, nf4, none
    bits: float | None = None
    group_size: int | None = None          # -1 = no grouping (one scale per row)
    act_order: bool | None = None
    qtype: str | None = None               # GGML/GGUF tensor type or file type
    file_format: str | None = None
    runtime: str | None = None
    est_file_bytes: int | None = None
    est_memory_bytes: int | None = None
    memory_ctx: int | None = None
    sizes: dict[str, int] = field(default_factory=dict)    # GGUF repos: bytes per common type
    assumed: list[str] = field(default_factory=list)
    tokens: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _find_base(s: str) -> str | None:
    amap = alias_map()
    best = None
    for alias, key in amap.items():
        if re.search(rf"(?<![a-z0-9]){re.escape(alias)}(?![a-z0-9])", s):
            if best is None or len(alias) > len(best[0]):
                best = (alias, key)
    return best[1] if best else None


def _has(s: str, word: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){word}(?![a-z0-9])", s) is not None


# Numbers a name may carry: anything beyond is a typo or a prank, refused with the part named
# (a 400-digit size would otherwise overflow, a 40-digit one print an absurd estimate).
MAX_PARAMS = 1e15            # parameters (1,000,000B)
MAX_EXPERTS = 4096
MAX_GROUP = 1 << 20
MAX_BITS = 64


def _name_number(token: str, text: str, what: str, lo: float, hi: float, hint: str, whole: bool = True):
    """The number `text` of the name part `token`, in [lo, hi]; one line naming the part otherwise."""
    name = f"name part {v.echo(token, 40)}: {what}"
    if whole:
        return v.as_int(text, name, int(lo), int(hi), hint=hint)
    return v.as_float(text, name, lo, hi, hint=hint)


def _size_and_base(info: NameInfo, s: str):
    """Parameter count from the name, the built-in config it names (its shape, or None), chat."""
    toks = info.tokens
    m = _SIZE_RE.search(s)
    if m:
        unit = 1e9 if m.group(3) == "b" else 1e6
        size_hint = f"a size is like 7b or 350m, above 0 and at most {MAX_PARAMS / 1e9:,.0f}b"
        n = _name_number(m.group(0), m.group(2), "size", 0, MAX_PARAMS / unit, size_hint, whole=False) * unit
        if n <= 0:
            v.fail(f"name part {v.echo(m.group(0), 40)}: size", m.group(2), "is zero", size_hint)
        if m.group(1):
            info.experts = _name_number(m.group(0), m.group(1), "expert count", 1, MAX_EXPERTS,
                                        f"experts are like 8x7b, 1 to {MAX_EXPERTS:,}")
            toks.append((m.group(0), f"mixture of {m.group(1)} experts of about {m.group(2)}{m.group(3).upper()} each"))
        else:
            toks.append((m.group(0), f"about {m.group(2)} {'billion' if m.group(3) == 'b' else 'million'} parameters"))
        info.params, info.params_from = int(n), "name"
    base = _find_base(normalize_name(s))
    shape = None
    if base:
        shape = from_name(base)
        info.base_model, info.params, info.params_from = base, shape.n_params, "config"
        if base not in s:
            info.notes.append(f"sizes use the {base} config; fine-tunes can change the vocabulary (e.g. extended Chinese vocabularies)")
        elif not s.startswith(base):
            info.notes.append(f"sizes use the {base} config; fine-tunes can change the vocabulary")
    if re.search(r"(?<![a-z0-9])(chat|instruct|it|sft)(?![a-z0-9])", s):
        info.chat = True
        toks.append((re.search(r"(chat|instruct|it|sft)", s).group(0), "fine-tuned for chat / instructions"))
    return shape


def _group_bits_order(info: NameInfo, s: str) -> None:
    toks = info.tokens
    gm = _GROUP_RE.search(s)
    bm = _BITS_RE.search(s)
    if gm:
        info.group_size = _name_number(gm.group(0), gm.group(1), "group size", 1, MAX_GROUP,
                                       f"a group size is like 128g, 1 to {MAX_GROUP:,}")
        toks.append((gm.group(0), f"group size {gm.group(1)}: one scale and zero point per {gm.group(1)} weights of a row"))
    if bm:
        info.bits = _name_number(bm.group(0), bm.group(1), "bit width", 1, MAX_BITS,
                                 f"a bit width is like 4bit, 1 to {MAX_BITS}")
        toks.append((bm.group(0), f"{bm.group(1)}-bit weights"))
    if _has(s, "act[-_]?order") or _has(s, "actorder") or "act-order" in s:
        info.act_order = True
        toks.append(("act-order", "GPTQ quantized columns in order of decreasing activation size (desc_act)"))


# method words, in the order they are looked for: (word, token explanation)
_METHOD_WORDS = [
    ("gptq", "GPTQ: post-training quantization that corrects rounding error with second-order "
             "information (Frantar et al. 2022); weights packed in int32, scales fp16"),
    ("awq", "AWQ: activation-aware weight quantization (Lin et al. 2023), 4-bit groups"),
    ("exl2", "ExLlamaV2 format: mixed bits per layer, an average bits-per-weight in the name"),
    ("ggml", "GGML: llama.cpp's file format before GGUF (August 2023), .bin files"),
    ("gguf", "GGUF: llama.cpp's file format; one file per quantization type"),
]


def _method(info: NameInfo, s: str, qm) -> None:
    """The quantization method: a method word, a GGML type, intN, NF4, a dense dtype, or GPTQ by naming."""
    toks = info.tokens
    word = next((w for w in _METHOD_WORDS if _has(s, w[0])), None)
    if word:
        info.method = word[0]
        toks.append(word)
    elif qm and qm.group(1) not in ("f16", "f32", "bf16"):
        info.method = "gguf"
    m4 = re.search(r"(?<![a-z0-9])int([48])(?![a-z0-9])", s)
    if info.method is None and m4:
        info.method = "int8" if m4.group(1) == "8" else "int4"
        info.bits = int(m4.group(1))
        toks.append((m4.group(0), f"{m4.group(1)}-bit integer weights, round-to-nearest with one scale per output row"))
        if info.group_size is None:
            info.group_size = -1
    elif m4 and info.bits is None:
        info.bits = int(m4.group(1))
    if info.method is None and (_has(s, "nf4") or _has(s, "bnb") and info.bits == 4):
        info.method, info.bits = "nf4", 4
        toks.append(("nf4", "bitsandbytes 4-bit NormalFloat (QLoRA)"))
    _dense(info, s, qm)
    if info.method is None and info.bits is not None and info.bits < 16:
        # "4bit-128g" with no method word: GPTQ-for-LLaMa's naming
        info.method = "gptq"
        info.assumed.append("method")
        info.notes.append("'<bits>bit-<group>g' without a method word is GPTQ-for-LLaMa's naming: GPTQ")


def _dense(info: NameInfo, s: str, qm) -> None:
    dense = re.search(r"(?<![a-z0-9])(fp32|fp16|bf16|f16|f32|float16|bfloat16|hf)(?![a-z0-9])", s)
    if info.method is None and dense and not (qm and qm.group(1) not in ("f16", "f32", "bf16")):
        d = dense.group(1)
        if d == "hf":
            if info.bits is None:
                info.method, info.bits = "none", 16
                info.tokens.append(("hf", "Hugging Face transformers checkpoint (unquantized, usually fp16/bf16)"))
        else:
            info.method = "none"
            info.bits = 32 if "32" in d else 16
            info.tokens.append((d, f"unquantized {d} weights ({info.bits} bits per weight)"))


def _ggml_type(info: NameInfo, s: str, qm) -> None:
    """GGML/GGUF tensor or file type, and its bits per weight from codecs.geometry."""
    if info.method not in ("ggml", "gguf"):
        return
    t = None
    if qm:
        t = qm.group(1)
    else:
        mq = re.search(r"(?<![a-z0-9])q([2-8])(?![a-z0-9])", s)
        if mq:
            t = f"q{mq.group(1)}_0"
            info.assumed.append("qtype")
            info.notes.append(f"'q{mq.group(1)}' without a variant means {t} (the only {mq.group(1)}-bit GGML type before K-quants)")
    if not t:
        return
    info.qtype = t
    if t in formats.IQ_FTYPES:
        info.notes.append(formats.IQ_NOTE)
    ggml_t = formats.GGUF_FTYPES.get(t, t)
    if ggml_t in GEOMETRIES:
        q = type_geometry(ggml_t)
        info.bits = round(q.bits_per_weight, 4)
        kind = "K-quant (256-weight super-blocks with 6/8-bit sub-block scales)" if "_k" in t else (
            "importance-matrix quant (IQ, lattice codebooks)" if t.startswith("iq") else
            "block quant: one fp16 scale (and min for _1) per 32 weights")
        mix = {"_s": "small mix", "_m": "medium mix: attn_v and ffn_down partly at higher bits",
               "_l": "large mix"}.get(t[-2:], "") if re.search(r"_k_[sml]$", t) else ""
        info.tokens.append((t, f"{t.upper()}: {kind}, {q.bits_per_weight:.3g} bits per weight" + (f"; {mix}" if mix else "")))


def _conventions(info: NameInfo) -> None:
    """What GPTQ and AWQ repos hold when the name does not say."""
    if info.method == "gptq":
        if info.bits is None:
            info.bits = 4
            info.assumed.append("bits")
        if info.group_size is None:
            info.group_size = 128
            info.assumed.append("group_size")
            info.notes.append("GPTQ repos without a group in the name usually hold 4-bit, group 128 in the main "
                              "branch (TheBloke's convention); other branches differ")
        if info.act_order is None:
            info.act_order = False
            info.assumed.append("act_order")
    if info.method == "awq":
        info.bits = info.bits or 4
        if info.group_size is None:
            info.group_size = 128
            info.assumed.append("group_size")


_FILE_FORMAT = {
    "gptq": "safetensors (older: .pt / .bin)", "awq": "safetensors", "exl2": "safetensors",
    "ggml": "GGML .bin (legacy, pre-GGUF)", "gguf": "GGUF (.gguf)", "int4": "PyTorch .bin / safetensors",
    "int8": "PyTorch .bin / safetensors", "nf4": "safetensors", "none": "safetensors or PyTorch .bin",
}


def explain(name: str) -> NameInfo:
    if not name or not name.strip():
        raise QuantkitError("empty model name", hint='e.g. quantkit explain "Llama-2-13B-chat-GPTQ"')
    raw = name.strip()
    # keep underscores (q4_k_m); drop an org prefix and a file extension
    s = raw.lower().replace(" ", "-").rstrip("/").split("/")[-1]
    s = re.sub(r"\.(gguf|bin|safetensors|pt)$", "", s)
    info = NameInfo(raw)
    shape = _size_and_base(info, s)
    qm = _QTYPE_RE.search(s)
    _group_bits_order(info, s)
    _method(info, s, qm)
    _ggml_type(info, s, qm)
    _conventions(info)
    info.file_format = _FILE_FORMAT.get(info.method)
    info.runtime = RUNTIME.get({"none": "dense"}.get(info.method, info.method)) if info.method else None
    if info.method is None:
        info.notes.append("no quantization tag found: probably an unquantized (fp16/bf16) checkpoint")
    _sizes(info, shape)
    return info


def _fmt_for(info: NameInfo) -> str | None:
    if info.method in ("gptq", "awq"):
        g = "none" if info.group_size == -1 else str(info.group_size)
        return f"{info.method}-{int(info.bits)}bit-{g}g"
    if info.method in ("ggml", "gguf") and info.qtype:
        t = info.qtype
        return t if t in formats.GGUF_FTYPES else None
    if info.method == "none":
        return "fp32" if info.bits == 32 else "fp16"
    if info.method in ("int4", "int8", "nf4"):
        return info.method
    return None


def _sizes(info: NameInfo, shape) -> None:
    fmt = _fmt_for(info)
    ctx = 4096
    if shape is not None:
        ctx = min(4096, shape.n_ctx_train or 4096)
        info.memory_ctx = ctx
        if fmt:
            f = formats.parse_format(fmt)
            inf = memory.inference(shape, f, ctx)
            info.est_file_bytes = inf.weights
            info.est_memory_bytes = inf.weights + inf.kv + inf.compute + inf.output + inf.overhead_cpu
        if info.method == "gguf" and not info.qtype:
            for t in ("q2_k", "q3_k_m", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0"):
                info.sizes[t] = formats.total(formats.tensor_bytes(shape, t))
        return
    if info.params is None:
        return
    # no config: bits per weight x parameters, plus a KV cache of a LLaMA-like model of this size
    if fmt:
        f = formats.parse_format(fmt)
        if f.family == "gguf":
            bpw = type_geometry(formats.GGUF_FTYPES[f.name]).bits_per_weight
        elif f.family in ("gptq", "awq"):
            g = f.group_size if f.group_size > 0 else 4096
            bpw = f.bits + (16 + f.bits) / g
        elif f.family == "dense":
            bpw = 32 if f.name == "fp32" else 16
        else:
            bpw = {"int8": 8.0, "int4": 4.0, "nf4": 4.127}[f.family]
        info.est_file_bytes = int(info.params * bpw / 8)
        info.memory_ctx = 2048
        # LLaMA-style rule of thumb for the KV cache: n_layer x d_model ~ 0.013 x params^(2/3)... kept
        # simple and stated: 2 x n_layer x d_model x 2 bytes per token with d_model ~ sqrt(params / (12 n_layer))
        n_layer = 40 if info.params > 10e9 else 32
        d = (info.params / (12 * n_layer)) ** 0.5
        kv = int(2 * n_layer * d * 2 * info.memory_ctx)
        info.est_memory_bytes = info.est_file_bytes + kv + memory.LLAMACPP_CPU_BASE
        info.notes.append(f"sizes estimated from the parameter count in the name ({info.params / 1e9:g}B), "
                          f"memory with a {info.memory_ctx}-token fp16 KV cache of a LLaMA-shaped model")
