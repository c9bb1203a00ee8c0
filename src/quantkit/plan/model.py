"""What the planner knows about a model: its shape and its tensors, read from headers only.

`ModelShape` carries ArchSpec's fields (quantkit.models.source) plus the few that decide which
tensors exist when we build them from a config; `from_arch_spec` takes an ArchSpec from the
model readers when one is at hand. Nothing here imports torch, so `quantkit plan` and
`quantkit explain` start in a fraction of a second (models.source is torch-free to import).

Sources: a GGUF file (header: metadata + tensor infos), an HF directory (config.json +
safetensors headers), one safetensors file (8-byte length + JSON header; config.json beside
it), or a name from models.yaml. Nothing is downloaded, no tensor data is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import json
import os
import re
import struct
from dataclasses import dataclass, field

import yaml

from ..codecs.registry import qtype
from ..models.source import TensorInfo
from ..util.errors import QuantkitError

_TABLE = os.path.join(os.path.dirname(__file__), "models.yaml")

# archs whose sliding-window layers get a window-sized cache in llama.cpp (llama_kv_cache_iswa)
# and in transformers (sliding cache layers); Mistral-7B-v0.1 runs as "llama" with a full cache
SWA_CACHE_ARCHS = {"gemma2", "gemma3", "gemma3n", "cohere2", "gpt-oss", "llama4"}


# The planner's tensors are the models layer's TensorInfo (torch-free to import).
Tensor = TensorInfo


@dataclass
class ModelShape:
    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    tied_embeddings: bool
    sliding_window: int | None = None
    sliding_window_pattern: list[bool] | None = None   # per layer: True = sliding-window layer
    norm: str = "rms"
    n_expert: int = 0
    n_expert_used: int = 0
    ffn: str = "gated"             # gated | gated_fused | plain
    bias: str = "none"             # none | qkv | all
    norms: str = "pre"             # pre | sandwich | parallel
    qk_norm: bool = False
    fused_qkv: bool = False
    source: str = ""
    stored_format: str | None = None      # "q4_k_m", "f16", "gptq-4bit-128g", ...
    tensors: list[Tensor] = field(default_factory=list)   # as stored; built from the config for names

    @property
    def n_embd_k_gqa(self) -> int:
        return self.n_head_kv * self.head_dim

    def swa_layers(self) -> list[bool]:
        """Per layer: does this layer's cache hold only the window?"""
        if not self.sliding_window or self.arch not in SWA_CACHE_ARCHS:
            return [False] * self.n_layer
        if self.sliding_window_pattern:
            return list(self.sliding_window_pattern)
        return [False] * self.n_layer

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors if not t.name.endswith((".g_idx", ".qzeros", ".scales")))

    @property
    def stored_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "tensors"}
        d["n_params"] = self.n_params
        d["stored_bytes"] = self.stored_bytes if self.stored_format else None
        return d


def from_arch_spec(spec, tensors=(), name: str = "") -> ModelShape:
    """Adapter from quantkit.models.source.ArchSpec / TensorInfo (duck-typed, no torch import)."""
    fields = {f.name for f in dataclasses.fields(ModelShape)}
    kw = {k: v for k, v in spec.to_dict().items() if k in fields}
    m = ModelShape(name=name or spec.arch, **kw)
    m.tensors = [Tensor(t.name, tuple(t.shape), t.type, t.nbytes) for t in tensors]
    return m


def _pattern(n_layer: int, pat) -> list[bool] | None:
    if pat is None:
        return None
    if isinstance(pat, list):
        return [bool(x) for x in pat]
    if pat == "odd-global":           # Gemma-2: layer 0 slides, layer 1 is global, ...
        return [i % 2 == 0 for i in range(n_layer)]
    n = int(pat)                       # every n-th layer is global
    return [(i + 1) % n != 0 for i in range(n_layer)]


# ---------------------------------------------------------------- tensors from a config

def _f(name, shape, dtype="f16"):
    t = qtype(dtype)
    return Tensor(name, tuple(shape), dtype, t.nbytes(shape))


def build_tensors(m: ModelShape, dtype: str = "bf16") -> list[Tensor]:
    """The tensors a checkpoint of this config holds, under GGUF names, 2D in `dtype`, 1D in f32
    (as convert_hf_to_gguf writes them)."""
    E, F, V, hd = m.n_embd, m.n_ff, m.n_vocab, m.head_dim
    q_out, kv_out = m.n_head * hd, m.n_head_kv * hd
    layer_norm = m.norm == "layer"
    out: list[Tensor] = [_f("token_embd.weight", (V, E), dtype)]

    def vec(name, n):
        out.append(_f(name, (n,), "f32"))

    def lin(name, o, i, bias):
        out.append(_f(f"{name}.weight", (o, i), dtype))
        if bias:
            vec(f"{name}.bias", o)

    for i in range(m.n_layer):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", E)
        if layer_norm:
            vec(p + "attn_norm.bias", E)
        qkv_bias = m.bias in ("qkv", "all")
        if m.fused_qkv:
            lin(p + "attn_qkv", q_out + 2 * kv_out, E, qkv_bias)
        else:
            lin(p + "attn_q", q_out, E, qkv_bias)
            lin(p + "attn_k", kv_out, E, qkv_bias)
            lin(p + "attn_v", kv_out, E, qkv_bias)
        lin(p + "attn_output", E, q_out, m.bias == "all")
        if m.qk_norm:
            vec(p + "attn_q_norm.weight", hd)
            vec(p + "attn_k_norm.weight", hd)
        if m.norms == "sandwich":
            vec(p + "post_attention_norm.weight", E)
            vec(p + "ffn_norm.weight", E)
            vec(p + "post_ffw_norm.weight", E)
        elif m.norms == "pre":
            vec(p + "ffn_norm.weight", E)
            if layer_norm:
                vec(p + "ffn_norm.bias", E)
        if m.n_expert:
            out.append(_f(p + "ffn_gate_inp.weight", (m.n_expert, E), "f32"))
            for nm, shape in (("ffn_gate_exps", (m.n_expert, F, E)), ("ffn_up_exps", (m.n_expert, F, E)),
                              ("ffn_down_exps", (m.n_expert, E, F))):
                out.append(_f(p + nm + ".weight", shape, dtype))
        elif m.ffn == "gated":
            lin(p + "ffn_gate", F, E, m.bias == "all")
            lin(p + "ffn_up", F, E, m.bias == "all")
            lin(p + "ffn_down", E, F, m.bias == "all")
        elif m.ffn == "gated_fused":
            lin(p + "ffn_up", 2 * F, E, m.bias == "all")
            lin(p + "ffn_down", E, F, m.bias == "all")
        else:
            lin(p + "ffn_up", F, E, m.bias == "all")
            lin(p + "ffn_down", E, F, m.bias == "all")
    vec("output_norm.weight", E)
    if layer_norm:
        vec("output_norm.bias", E)
    if not m.tied_embeddings:
        lin("output", V, E, m.bias == "all")
    return out


# ---------------------------------------------------------------- built-in names

@functools.lru_cache(maxsize=1)
def _table() -> dict[str, dict]:
    with open(_TABLE, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    out = {}
    for r in raw["models"]:
        out[r["name"]] = r
    return out


def known_names() -> list[str]:
    return sorted(_table())


def _alias_map() -> dict[str, str]:
    amap = {}
    for name, r in _table().items():
        amap[name] = name
        for a in r.get("aliases", []):
            amap[a] = name
    return amap


def normalize_name(s: str) -> str:
    s = os.path.basename(s.strip().rstrip("/")).lower().replace("_", "-").replace(" ", "-")
    s = re.sub(r"^(meta-llama|mistralai|qwen|google|microsoft|thudm|huggyllama|thebloke)/", "", s)
    return s


def lookup_name(name: str) -> str | None:
    """Table key for a model name, or None."""
    return _alias_map().get(normalize_name(name))


def from_name(name: str) -> ModelShape:
    key = lookup_name(name)
    if key is None:
        amap = _alias_map()
        close = difflib.get_close_matches(normalize_name(name), list(amap), n=3, cutoff=0.6)
        close = list(dict.fromkeys(amap[c] for c in close))
        hint = (f"did you mean: {', '.join(close)}? " if close else "") + \
            "give an HF directory, a .gguf or .safetensors file, or one of `quantkit plan --list-models`"
        raise QuantkitError(f"unknown model '{name}' (not a file and not in the built-in table)", hint=hint)
    r = dict(_table()[key])
    n_layer = r["n_layer"]
    m = ModelShape(
        name=key, arch=r["arch"], n_layer=n_layer, n_embd=r["n_embd"], n_head=r["n_head"],
        n_head_kv=r["n_head_kv"], head_dim=r.get("head_dim") or r["n_embd"] // r["n_head"],
        n_ff=r["n_ff"], n_vocab=r["n_vocab"], n_ctx_train=r["n_ctx_train"],
        tied_embeddings=r["tied_embeddings"], sliding_window=r.get("sliding_window"),
        sliding_window_pattern=_pattern(n_layer, r.get("sliding_window_pattern")) if r.get("sliding_window") else None,
        norm=r["norm"], n_expert=r.get("n_expert", 0), n_expert_used=r.get("n_expert_used", 0),
        ffn=r["ffn"], bias=r["bias"], norms=r["norms"], qk_norm=r["qk_norm"],
        fused_qkv=r.get("fused_qkv", False), source=r["source"])
    m.tensors = build_tensors(m, "bf16")
    return m


# ---------------------------------------------------------------- GGUF

_GGUF_FTYPE = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k",
               11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s",
               17: "q5_k_m", 18: "q6_k", 19: "iq2_xxs", 20: "iq2_xs", 21: "q2_k_s", 22: "iq3_xs",
               23: "iq3_xxs", 24: "iq1_s", 25: "iq4_nl", 26: "iq3_s", 27: "iq3_m", 28: "iq2_s",
               29: "iq2_m", 30: "iq4_xs", 31: "iq1_m", 32: "bf16"}


_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class ArrayInfo(list):
    """A GGUF array value: its first elements (all of them when short) and its length."""
    def __init__(self, items, length):
        super().__init__(items)
        self.length = length


def read_gguf_header(path: str) -> tuple[dict, list[Tensor], int]:
    """(metadata, tensors, data_offset) from a GGUF header, without touching tensor data.

    gguf-py's GGUFReader builds a numpy view per array element (a 262k-token vocabulary takes
    tens of seconds); the planner needs only scalars, short arrays and array lengths.
    """
    import mmap

    try:
        f = open(path, "rb")
    except OSError as e:
        raise QuantkitError(f"cannot open ({e.strerror})", path) from None
    with f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = 0

        def take(fmt):
            nonlocal pos
            v = struct.unpack_from(fmt, mm, pos)[0]
            pos += struct.calcsize(fmt)
            return v

        def string():
            nonlocal pos
            n = take("<Q")
            if n > len(mm) - pos:
                raise ValueError("string runs past the end of the file")
            v = bytes(mm[pos:pos + n]).decode("utf-8", "replace")
            pos += n
            return v

        def value(vt, keep=True):
            nonlocal pos
            if vt in _GGUF_SCALAR:
                return take(_GGUF_SCALAR[vt])
            if vt == 8:
                if keep:
                    return string()
                n = take("<Q")
                pos += n
                return None
            if vt == 9:
                et, n = take("<I"), take("<Q")
                items = []
                if et in _GGUF_SCALAR and n > 64:
                    skip = n * struct.calcsize(_GGUF_SCALAR[et])
                    pos += skip
                else:
                    for i in range(n):
                        v = value(et, keep=i < 64)
                        if i < 64:
                            items.append(v)
                return ArrayInfo(items, n)
            raise ValueError(f"unknown GGUF value type {vt}")

        try:
            if mm[:4] != b"GGUF":
                raise ValueError("no GGUF magic")
            pos = 4
            version = take("<I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            n_tensors, n_kv = take("<Q"), take("<Q")
            meta = {}
            for _ in range(n_kv):
                key = string()
                meta[key] = value(take("<I"))
            tensors = []
            for _ in range(n_tensors):
                name = string()
                nd = take("<I")
                dims = [take("<Q") for _ in range(nd)]
                tt = take("<I")
                take("<Q")
                shape = tuple(int(x) for x in reversed(dims))
                q = qtype(tt)
                tensors.append(Tensor(name, shape, q.name, q.nbytes(shape)))
            align = int(meta.get("general.alignment", 32))
            data_offset = (pos + align - 1) // align * align
        except (ValueError, struct.error, KeyError) as e:
            raise QuantkitError(f"not a readable GGUF file ({e})", path) from None
    return meta, tensors, data_offset


def from_gguf(path: str) -> ModelShape:
    meta, tensors, _ = read_gguf_header(path)

    def get(key, default=None):
        return meta.get(key, default)

    arch = get("general.architecture")
    if not arch:
        raise QuantkitError("GGUF has no general.architecture key", path)
    need = {"n_layer": f"{arch}.block_count", "n_embd": f"{arch}.embedding_length",
            "n_head": f"{arch}.attention.head_count"}
    vals = {k: get(v) for k, v in need.items()}
    missing = [need[k] for k, v in vals.items() if v is None]
    if missing:
        raise QuantkitError(f"GGUF metadata lacks {', '.join(missing)}", path,
                            "the planner needs them for the KV cache")
    n_layer, n_embd, n_head = int(vals["n_layer"]), int(vals["n_embd"]), int(vals["n_head"])
    n_head_kv = get(f"{arch}.attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list):   # per-layer lists exist for some archs; the cache uses the max
        n_head_kv = max(n_head_kv) if n_head_kv else n_head
    head_dim = int(get(f"{arch}.attention.key_length", n_embd // n_head))
    names = {t.name for t in tensors}
    emb = next((t for t in tensors if t.name == "token_embd.weight"), None)
    toks = get("tokenizer.ggml.tokens")
    n_vocab = (toks.length if isinstance(toks, ArrayInfo) else 0) or (emb.shape[0] if emb else 0)
    window = get(f"{arch}.attention.sliding_window")
    pat = get(f"{arch}.attention.sliding_window_pattern")
    if window and pat is None:
        # llama.cpp hard-codes these patterns (llama-model.cpp: set_swa_pattern)
        pat = {"gemma3": 6, "gemma2": "odd-global", "cohere2": 4, "gpt-oss": 2}.get(arch)
    ftype = get("general.file_type")
    n_ff = get(f"{arch}.feed_forward_length", 0)
    if isinstance(n_ff, list):
        n_ff = max(n_ff) if n_ff else 0
    m = ModelShape(
        name=os.path.basename(path), arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
        n_head_kv=int(n_head_kv), head_dim=head_dim, n_ff=int(n_ff), n_vocab=int(n_vocab),
        n_ctx_train=int(get(f"{arch}.context_length", 0) or 0),
        tied_embeddings="output.weight" not in names, sliding_window=int(window) if window else None,
        sliding_window_pattern=_pattern(n_layer, pat) if window else None,
        n_expert=int(get(f"{arch}.expert_count", 0) or 0), n_expert_used=int(get(f"{arch}.expert_used_count", 0) or 0),
        source=f"GGUF header of {path}",
        stored_format=_GGUF_FTYPE.get(int(ftype), f"ftype {ftype}") if ftype is not None else "gguf")
    m.tensors = tensors
    return m


# ---------------------------------------------------------------- HF config / safetensors

_ST_DTYPE = {"F64": ("f64", 8), "F32": ("f32", 4), "F16": ("f16", 2), "BF16": ("bf16", 2),
             "I64": ("i64", 8), "I32": ("i32", 4), "I16": ("i16", 2), "I8": ("i8", 1), "U8": ("u8", 1),
             "BOOL": ("bool", 1), "F8_E4M3": ("f8_e4m3", 1), "F8_E5M2": ("f8_e5m2", 1)}


def read_safetensors_header(path: str) -> list[Tensor]:
    """Tensor names, shapes, dtypes and exact byte sizes from the JSON header; no data read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} is larger than the file")
            hdr = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise QuantkitError(f"not a readable safetensors file ({e})", path) from None
    out = []
    for name, info in hdr.items():
        if name == "__metadata__":
            continue
        dt, _ = _ST_DTYPE.get(info["dtype"], (info["dtype"].lower(), 0))
        b0, b1 = info["data_offsets"]
        out.append(Tensor(name, tuple(info["shape"]), dt, int(b1 - b0)))
    return out


_HF_KEYS = {  # ModelShape field -> config keys tried in order (LLaMA-style, GPT-style, ChatGLM)
    "n_layer": ("num_hidden_layers", "n_layer", "num_layers"),
    "n_embd": ("hidden_size", "n_embd", "d_model"),
    "n_head": ("num_attention_heads", "n_head"),
    "n_ff": ("intermediate_size", "ffn_hidden_size", "n_inner"),
    "n_vocab": ("vocab_size", "padded_vocab_size"),
}

_HF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
            "Qwen2ForCausalLM": "qwen2", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
            "Gemma3ForConditionalGeneration": "gemma3", "PhiForCausalLM": "phi2", "ChatGLMModel": "chatglm",
            "ChatGLMForConditionalGeneration": "chatglm", "GemmaForCausalLM": "gemma",
            "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3"}


def from_hf_config(cfg: dict, name: str, path: str | None = None) -> ModelShape:
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        cfg = {**cfg, **cfg["text_config"]}
    vals, missing = {}, []
    for k, keys in _HF_KEYS.items():
        v = next((cfg[x] for x in keys if cfg.get(x) is not None), None)
        if v is None:
            missing.append(keys[0])
        vals[k] = v
    if missing:
        raise QuantkitError(f"config.json lacks {', '.join(missing)}", path,
                            "the planner needs them for weights and KV cache")
    for k, v in vals.items():
        if not isinstance(v, int) or v <= 0:
            raise QuantkitError(f"config.json: {k} = {v!r} is not a positive integer", path)
    archs = cfg.get("architectures") or []
    arch = _HF_ARCH.get(archs[0] if archs else "", (cfg.get("model_type") or "llama").replace("_text", ""))
    n_head = vals["n_head"]
    n_head_kv = cfg.get("num_key_value_heads") or (cfg.get("multi_query_group_num") if cfg.get("multi_query_attention") else None) or n_head
    head_dim = cfg.get("head_dim") or cfg.get("kv_channels") or vals["n_embd"] // n_head
    ctx = cfg.get("max_position_embeddings") or cfg.get("seq_length") or cfg.get("n_positions") or 0
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    pat = None
    if window:
        if isinstance(cfg.get("layer_types"), list):
            pat = [t == "sliding_attention" for t in cfg["layer_types"]]
        elif cfg.get("sliding_window_pattern"):
            pat = int(cfg["sliding_window_pattern"])
        elif arch == "gemma2":
            pat = "odd-global"
        elif arch == "gemma3":
            pat = 6
    tied = cfg.get("tie_word_embeddings", arch in ("gemma", "gemma2", "gemma3"))
    m = ModelShape(
        name=name, arch=arch, n_layer=vals["n_layer"], n_embd=vals["n_embd"], n_head=n_head,
        n_head_kv=int(n_head_kv), head_dim=int(head_dim), n_ff=vals["n_ff"], n_vocab=vals["n_vocab"],
        n_ctx_train=int(ctx), tied_embeddings=bool(tied), sliding_window=window,
        sliding_window_pattern=_pattern(vals["n_layer"], pat) if window else None,
        norm="layer" if arch == "phi2" else "rms",
        n_expert=cfg.get("num_local_experts") or cfg.get("num_experts") or 0,
        n_expert_used=cfg.get("num_experts_per_tok") or 0,
        ffn="plain" if arch == "phi2" else ("gated_fused" if arch == "chatglm" else "gated"),
        bias="all" if arch == "phi2" else ("qkv" if arch in ("qwen2", "chatglm") or cfg.get("add_qkv_bias") else "none"),
        norms="parallel" if arch == "phi2" else ("sandwich" if arch in ("gemma2", "gemma3") else "pre"),
        qk_norm=arch in ("gemma3", "qwen3"), fused_qkv=arch == "chatglm",
        source=f"config.json in {path}" if path else "config")
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") == "gptq" or q.get("bits"):
        m.stored_format = f"gptq-{q.get('bits', 4)}bit-{q.get('group_size', 128)}g"
    return m


def _read_config(d: str) -> dict:
    p = os.path.join(d, "config.json")
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise QuantkitError("no config.json here", d, "the planner needs it for the KV cache shape") from None
    except (OSError, ValueError) as e:
        raise QuantkitError(f"config.json is not valid JSON ({e})", p) from None


def from_hf_dir(path: str) -> ModelShape:
    cfg = _read_config(path)
    m = from_hf_config(cfg, os.path.basename(os.path.abspath(path)), path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        m.tensors = [t for f in files for t in read_safetensors_header(f)]
        dts = {t.type for t in m.tensors if len(t.shape) >= 2}
        if not m.stored_format:
            m.stored_format = "bf16" if dts == {"bf16"} else ("f16" if dts == {"f16"} else ("f32" if dts == {"f32"} else "mixed"))
    else:
        m.tensors = build_tensors(m, "bf16")
    return m


def from_safetensors(path: str) -> ModelShape:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(os.path.join(d, "config.json")):
        read_safetensors_header(path)   # a broken file is reported as such first
        raise QuantkitError("no config.json beside this safetensors file", path,
                            "the planner needs num_hidden_layers, hidden_size, num_attention_heads, "
                            "intermediate_size, vocab_size from it")
    m = from_hf_config(_read_config(d), os.path.basename(path), d)
    m.tensors = read_safetensors_header(path)
    dts = {t.type for t in m.tensors if len(t.shape) >= 2}
    m.stored_format = m.stored_format or (next(iter(dts)) if len(dts) == 1 else "mixed")
    return m


def load(model: str) -> ModelShape:
    """A model from a path (GGUF, safetensors, HF dir) or a built-in name."""
    if os.path.isdir(model):
        return from_hf_dir(model)
    if os.path.isfile(model):
        with open(model, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return from_gguf(model)
        if model.endswith(".safetensors"):
            return from_safetensors(model)
        raise QuantkitError("not a GGUF or safetensors file", model,
                            "give a .gguf, a .safetensors, an HF directory or a model name")
    if os.sep in model and not lookup_name(model) and (model.startswith((".", "/", "~")) or model.endswith((".gguf", ".safetensors"))):
        raise QuantkitError("no such file or directory", model, "check the path")
    return from_name(model)
