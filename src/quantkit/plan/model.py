"""What the planner knows about a model: its shape and its tensors, read from headers only.

`ModelShape` carries ArchSpec's fields (quantkit.models.source) plus the few that decide which
tensors exist when we build them from a config; `from_arch_spec` takes an ArchSpec from the
model readers when one is at hand. Nothing here imports torch, so `quantkit plan` and
`quantkit explain` start in a fraction of a second.

Sources: a GGUF file (its header through models.gguf_file), an HF directory (config.json +
safetensors headers through models.safetensors_file), one safetensors file (config.json beside
it), or a name from models.yaml. Config keys, HF classes and block layouts are models.arch's
data. Nothing is downloaded, no tensor data is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import json
import os
import re
from dataclasses import dataclass, field

import yaml
from gguf import LlamaFileType

from ..codecs.geometry import type_geometry
from ..models.arch import (HF_CLASS_ARCH, HF_CONFIG_KEYS, HF_CONFIG_OPTIONAL_KEYS, BlockLayout, block_layout,
                           find_hf_arch)
from ..models.fused_experts import is_fused, per_expert_view
from ..models.gguf_file import GGUFFile, GGUFFormatError
from ..models.gguf_hparams import GGUFHParams, read_hparams
from ..models.hf_config import check_config
from ..models.safetensors_file import SafetensorsFile
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
    norms: str = "pre"             # pre | sandwich | post (OLMo-2: after each sublayer only) | parallel
    qk_norm: bool | str = False    # True: per head (head_dim wide); "full": over all heads (OLMo-2)
    fused_qkv: bool = False
    source: str = ""
    stored_format: str | None = None      # "q4_k_m", "f16", "gptq-4bit-128g", ...
    tensors: list[Tensor] = field(default_factory=list)   # as stored; built from the config for names
    vision: object | None = None   # plan.vision.VisionPlan of a vision-language model (its mmproj file)

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
    t = type_geometry(dtype)
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
        if m.norms != "post":
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
            full = m.qk_norm == "full"
            vec(p + "attn_q_norm.weight", q_out if full else hd)
            vec(p + "attn_k_norm.weight", kv_out if full else hd)
        if m.norms in ("sandwich", "post"):
            vec(p + "post_attention_norm.weight", E)
            if m.norms == "sandwich":
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


def alias_map() -> dict[str, str]:
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
    return alias_map().get(normalize_name(name))


def from_name(name: str) -> ModelShape:
    key = lookup_name(name)
    if key is None:
        amap = alias_map()
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

def file_type_name(ftype: int) -> str:
    """llama.cpp's file type (general.file_type) by name: 15 -> "q4_k_m", from gguf-py's LlamaFileType."""
    try:
        name = LlamaFileType(int(ftype)).name        # ALL_F32, MOSTLY_Q4_K_M
    except ValueError:
        return f"ftype {ftype}"
    kind, _, rest = name.partition("_")
    return rest.lower() if kind in ("ALL", "MOSTLY") else f"ftype {ftype}"


def read_gguf(path: str) -> tuple[dict, list[Tensor], GGUFHParams]:
    """(metadata values, tensors, checked hyper-parameters) from a GGUF header
    (models.gguf_file, models.gguf_hparams), no tensor data read."""
    try:
        f = GGUFFile(path)
    except OSError as e:
        raise QuantkitError(f"cannot open ({e.strerror})", path) from None
    except GGUFFormatError as e:
        raise QuantkitError(f"not a readable GGUF file ({e})", path, "re-download or re-create the file") from None
    try:
        hp = read_hparams(f.fields, {t.name: t.shape for t in f.tensors}, path)
        meta = {k: fld.value for k, fld in f.fields.items()}
        tensors = []
        for t in f.tensors:
            q = type_geometry(t.ggml_type)
            tensors.append(Tensor(t.name, t.shape, q.name, q.nbytes(t.shape)))
    finally:
        f.close()
    return meta, tensors, hp


def from_gguf(path: str) -> ModelShape:
    meta, tensors, hp = read_gguf(path)
    pat = hp.sliding_window_pattern
    if hp.sliding_window and pat is None:
        pat = block_layout(hp.arch).swa_pattern      # llama.cpp's hard-coded layout
    ftype = meta.get("general.file_type")
    ftype = ftype if isinstance(ftype, int) and not isinstance(ftype, bool) else None
    m = ModelShape(
        name=os.path.basename(path), arch=hp.arch, n_layer=hp.n_layer, n_embd=hp.n_embd, n_head=hp.n_head,
        n_head_kv=hp.n_head_kv, head_dim=hp.head_dim, n_ff=hp.n_ff, n_vocab=hp.n_vocab,
        n_ctx_train=hp.n_ctx_train, tied_embeddings="output.weight" not in {t.name for t in tensors},
        sliding_window=hp.sliding_window,
        sliding_window_pattern=_pattern(hp.n_layer, pat) if hp.sliding_window else None,
        n_expert=hp.n_expert, n_expert_used=hp.n_expert_used,
        source=f"GGUF header of {path}",
        stored_format=file_type_name(ftype) if ftype is not None else "gguf")
    m.tensors = tensors
    return m


# ---------------------------------------------------------------- HF config / safetensors

def read_safetensors(path: str) -> list[Tensor]:
    """Tensor names, shapes, dtypes and exact byte sizes from the header (models.safetensors_file)."""
    with SafetensorsFile(path) as f:
        return [Tensor(name, e.shape, e.dtype.lower(), e.nbytes) for name, e in f.entries.items()]


def per_expert_tensors(cfg: dict, tensors: list[Tensor], path: str) -> list[Tensor]:
    """A checkpoint whose experts are stored fused (transformers' gate_up_proj / down_proj) as the
    per-expert checkpoint it stands for (models.fused_experts), so both plan alike."""
    if not any(is_fused(t.name) for t in tensors):
        return tensors
    tc = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    archs = [a for a in (cfg.get("architectures") or tc.get("architectures") or []) if isinstance(a, str)]
    arch = find_hf_arch(archs, cfg.get("model_type") or tc.get("model_type"))
    by_name = {t.name: t for t in tensors}
    view, _ = per_expert_view(arch.key if arch else "", {t.name: tuple(t.shape) for t in tensors}, None, path,
                              payload=by_name.get)
    out = []
    for name, (shape, src) in view.items():
        n, whole = 1, 1
        for d in shape:
            n *= d
        for d in src.shape:
            whole *= d
        out.append(Tensor(name, shape, src.type, src.nbytes * n // whole if whole else 0))
    return out


def _first(cfg: dict, keys: tuple[str, ...]):
    """The first of `keys` that config.json sets to something other than 0/null/false."""
    return next((cfg[x] for x in keys if cfg.get(x)), None)


def _hf_required(cfg: dict, path: str | None) -> dict[str, int]:
    vals, missing = {}, []
    for k, keys in HF_CONFIG_KEYS.items():
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
    return vals


def _hf_swa_pattern(cfg: dict, layout: BlockLayout):
    if isinstance(cfg.get("layer_types"), list):
        return [t == "sliding_attention" for t in cfg["layer_types"]]
    if cfg.get("sliding_window_pattern"):
        return int(cfg["sliding_window_pattern"])
    return layout.swa_pattern


def from_hf_config(cfg: dict, name: str, path: str | None = None) -> ModelShape:
    """A shape from config.json: keys, classes and block layouts from models.arch."""
    check_config(cfg, os.path.join(path, "config.json") if path else None)
    from .vision import vision_plan
    vision = vision_plan(cfg, path or "")
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        archs = cfg.get("architectures") or []
        if isinstance(cfg["text_config"], dict) and not any(a in HF_CLASS_ARCH for a in archs):
            # a vision-language wrapper (LlavaForConditionalGeneration): plan its language model's type
            tc = cfg["text_config"]
            cfg = {**cfg, "architectures": [a for a in tc.get("architectures") or [] if isinstance(a, str)]
                   if isinstance(tc.get("architectures"), list) else [],
                   "model_type": tc.get("model_type") if isinstance(tc.get("model_type"), str) else None}
        cfg = {**cfg, **cfg["text_config"]}
    vals = _hf_required(cfg, path)
    opt = {k: _first(cfg, keys) for k, keys in HF_CONFIG_OPTIONAL_KEYS.items()}
    archs = cfg.get("architectures") or []
    arch = HF_CLASS_ARCH.get(archs[0] if archs else "", (cfg.get("model_type") or "llama").replace("_text", ""))
    lay = block_layout(arch)
    n_head = vals["n_head"]
    n_head_kv = opt["n_head_kv"] or (cfg.get("multi_query_group_num") if cfg.get("multi_query_attention") else None) \
        or n_head
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    pat = _hf_swa_pattern(cfg, lay) if window else None
    m = ModelShape(
        name=name, arch=arch, n_layer=vals["n_layer"], n_embd=vals["n_embd"], n_head=n_head,
        n_head_kv=int(n_head_kv), head_dim=int(opt["head_dim"] or vals["n_embd"] // n_head), n_ff=vals["n_ff"],
        n_vocab=vals["n_vocab"], n_ctx_train=int(opt["n_ctx_train"] or 0),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", lay.tied_embeddings)), sliding_window=window,
        sliding_window_pattern=_pattern(vals["n_layer"], pat) if window else None,
        norm=lay.norm, n_expert=opt["n_expert"] or 0, n_expert_used=opt["n_expert_used"] or 0,
        ffn=lay.ffn, bias="qkv" if lay.bias == "none" and cfg.get("add_qkv_bias") else lay.bias,
        norms=lay.norms, qk_norm=lay.qk_norm, fused_qkv=lay.fused_qkv,
        source=f"config.json in {path}" if path else "config", vision=vision)
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
    except (OSError, ValueError, RecursionError) as e:
        raise QuantkitError(f"config.json is not valid JSON ({type(e).__name__})", p) from None


def from_hf_dir(path: str) -> ModelShape:
    cfg = _read_config(path)
    m = from_hf_config(cfg, os.path.basename(os.path.abspath(path)), path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        m.tensors = per_expert_tensors(cfg, [t for f in files for t in read_safetensors(f)], path)
        if m.vision is not None:      # the vision tower and projector are planned as the mmproj file
            m.tensors = [t for t in m.tensors if not t.name.removeprefix("model.").startswith(
                ("vision_tower.", "vision_model.", "multi_modal_projector."))]
        dts = {t.type for t in m.tensors if len(t.shape) >= 2}
        if not m.stored_format:
            m.stored_format = "bf16" if dts == {"bf16"} else ("f16" if dts == {"f16"} else ("f32" if dts == {"f32"} else "mixed"))
    else:
        m.tensors = build_tensors(m, "bf16")
    return m


def from_safetensors(path: str) -> ModelShape:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(os.path.join(d, "config.json")):
        read_safetensors(path)   # a broken file is reported as such first
        raise QuantkitError("no config.json beside this safetensors file", path,
                            "the planner needs num_hidden_layers, hidden_size, num_attention_heads, "
                            "intermediate_size, vocab_size from it")
    m = from_hf_config(_read_config(d), os.path.basename(path), d)
    m.tensors = per_expert_tensors(_read_config(d), read_safetensors(path), path)
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
