"""The vision half of a vision-language Hugging Face directory: its vision tower and projector.

A vision-language model (transformers' LlavaForConditionalGeneration: a CLIP or SigLIP vision
tower, a two-layer MLP projector and a llama-family language model; Gemma3ForConditionalGeneration:
SigLIP, an average pool and a linear projector) keeps the language model's config in
config.json's text_config and the tower's in vision_config. The language model is read by
models.hf.HFSource like any other; this module reads the rest, in the terms llama.cpp's
multimodal projector file (mmproj, tools/mtmd/clip.cpp) uses: `VisionSpec` (the clip.vision.*
hyper-parameters) and `VisionSource` (the tower's and projector's tensors under their GGUF names
from gguf-py's MODEL_ARCH.MMPROJ tensor map, values transformed as llama.cpp expects them).

Tensors are read from safetensors with pread, one per `load`, as HFSource reads the language model.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .safetensors_file import SafetensorsFile
from ..util.errors import QuantkitError

# vision_config model_type -> (our name, hidden_act llama.cpp runs when the config does not say)
SUPPORTED_TOWERS: dict[str, str] = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# config.json model_type -> llama.cpp projector type (clip.projector_type)
PROJECTORS: dict[str, str] = {"llava": "mlp", "gemma3": "gemma3"}
# image normalisation when the directory has no preprocessor_config.json: the image processor
# class's defaults (CLIPImageProcessor: OpenAI's CLIP statistics; SigLIP / Gemma-3: 0.5)
_DEFAULT_NORM: dict[str, tuple[list[float], list[float]]] = {
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}
# vision tower activations clip.cpp runs (clip.use_gelu: tanh GELU; clip.use_silu; neither: quick GELU)
TOWER_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new", "silu")
_ST_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_TOWER_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "vision_model.")
_PROJ_PREFIXES = ("multi_modal_projector.",)


@dataclass
class VisionSpec:
    """What llama.cpp's clip.cpp needs to know about a vision tower and its projector."""

    model_type: str                 # config.json model_type: "llava", "gemma3", ...
    tower: str                      # vision_config model_type: "clip_vision_model", ...
    projector: str                  # clip.projector_type: "mlp", "gemma3"
    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_head: int
    n_layer: int                    # encoder layers the file holds (up to the deepest feature layer)
    n_layer_total: int              # encoder layers of the checkpoint
    eps: float
    hidden_act: str
    n_embd_text: int                # the language model's hidden size (clip.vision.projection_dim)
    feature_layers: list[int] | None = None    # hidden-state indices (0 = embeddings), non-negative
    image_mean: list[float] = field(default_factory=list)
    image_std: list[float] = field(default_factory=list)
    merge: int = 1                  # gemma3: pooling kernel per side
    n_image_tokens: int = 0         # embeddings one image becomes in the language model's context

    @property
    def kind(self) -> str:
        return SUPPORTED_TOWERS[self.tower]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def vision_config(config: dict) -> dict | None:
    """config.json's vision_config, None for a text-only model."""
    vc = config.get("vision_config")
    return vc if isinstance(vc, dict) else None


def unsupported_reason(config: dict) -> str | None:
    """Why quantkit cannot write this model's vision half as an mmproj file (None: it can)."""
    vc = vision_config(config) or {}
    tower = vc.get("model_type")
    mt = config.get("model_type")
    if not isinstance(mt, str) or mt not in PROJECTORS:
        return f"vision-language model type {mt!r} (supported: {', '.join(sorted(PROJECTORS))})"
    if not isinstance(tower, str) or tower not in SUPPORTED_TOWERS:
        return f"vision tower type {tower!r} (supported: {', '.join(sorted(SUPPORTED_TOWERS))})"
    act = vc.get("hidden_act", "quick_gelu" if tower == "clip_vision_model" else "gelu_pytorch_tanh")
    if not isinstance(act, str) or act not in TOWER_ACTIVATIONS:
        return f"vision tower activation {act!r} (llama.cpp runs {', '.join(TOWER_ACTIVATIONS)})"
    if mt == "gemma3" and tower != "siglip_vision_model":
        return f"vision tower type {tower!r} for gemma3 (llama.cpp runs SigLIP there)"
    if mt == "llava":
        # llama.cpp feeds every patch and never the class token: CLIP (which has one) must drop it
        # ("default"), SigLIP (which has none) must keep every position ("full")
        strategy = config.get("vision_feature_select_strategy", "default")
        want = "default" if tower == "clip_vision_model" else "full"
        if strategy != want:
            return (f"vision_feature_select_strategy {strategy!r} with a {tower} tower (llama.cpp runs "
                    f"the equivalent of {want!r})")
        if config.get("projector_hidden_act", "gelu") not in ("gelu", "gelu_pytorch_tanh"):
            return f"projector_hidden_act {config.get('projector_hidden_act')!r} (llama.cpp's MLP projector uses GELU)"
        if config.get("multimodal_projector_bias", True) is False:
            return "MLP projector without biases (llama.cpp's MLP projector adds them)"
    return None


def _int(d: dict, key: str, where: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise QuantkitError(f"vision_config has no valid {key}", where, "the config does not describe the vision tower")
    return v


def _number(d: dict, key: str, default: float, where: str) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise QuantkitError(f"{key} = {v!r} is not a positive number", where)
    return float(v)


def _feature_layers(config: dict, n_layer: int) -> list[int] | None:
    fl = config.get("vision_feature_layer")
    if fl is None:
        return None
    fl = [fl] if isinstance(fl, int) else fl
    if not isinstance(fl, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in fl):
        raise QuantkitError(f"vision_feature_layer {fl!r} is not a layer index or a list of them", "config.json")
    # hidden_states[i]: 0 is the embeddings, i the output of block i-1; negative counts from the end
    out = [i if i >= 0 else n_layer + 1 + i for i in fl]
    if not out or any(not 0 <= i <= n_layer for i in out):
        raise QuantkitError(f"vision_feature_layer {fl} is outside the tower's {n_layer} layers", "config.json")
    return out


def vision_spec(path: str, config: dict) -> VisionSpec:
    """The VisionSpec of a supported vision-language directory (see unsupported_reason)."""
    where = os.path.join(path, "config.json")
    vc = vision_config(config) or {}
    tc = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    kind = SUPPORTED_TOWERS[vc["model_type"]]
    projector = PROJECTORS[config["model_type"]]
    image_size, patch = _int(vc, "image_size", where), _int(vc, "patch_size", where)
    n_layer = _int(vc, "num_hidden_layers", where)
    side = image_size // patch
    mean, std = _DEFAULT_NORM[kind]
    pre = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pre):
        try:
            with open(pre, encoding="utf-8") as f:
                pc = json.load(f)
            mean, std = [float(x) for x in pc.get("image_mean", mean)], [float(x) for x in pc.get("image_std", std)]
            if len(mean) != 3 or len(std) != 3 or not all(x > 0 for x in std):
                raise ValueError("image_mean / image_std need 3 values, std positive")
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise QuantkitError(f"cannot read preprocessor_config.json ({type(e).__name__}: {e})", pre) from None
    spec = VisionSpec(
        model_type=config["model_type"], tower=vc["model_type"], projector=projector,
        image_size=image_size, patch_size=patch, n_embd=_int(vc, "hidden_size", where),
        n_ff=_int(vc, "intermediate_size", where), n_head=_int(vc, "num_attention_heads", where),
        n_layer=n_layer, n_layer_total=n_layer,
        eps=_number(vc, "layer_norm_eps", 1e-5 if kind == "clip" else 1e-6, where),
        hidden_act=str(vc.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")),
        n_embd_text=_int(tc, "hidden_size", where), image_mean=mean, image_std=std)
    if projector == "mlp":
        fl = _feature_layers(config, n_layer)
        spec.feature_layers = fl
        # llama.cpp runs the tower only up to the deepest feature layer (default: the last but one)
        spec.n_layer = max(fl) if fl else n_layer - 1
        spec.n_image_tokens = side * side
    else:
        per_image = int(_number(config, "mm_tokens_per_image", 256, where))
        per_side = int(round(per_image ** 0.5))
        if per_side <= 0 or side % per_side:
            raise QuantkitError(f"mm_tokens_per_image {per_image} does not pool {side}x{side} patches evenly",
                                where)
        spec.merge = side // per_side
        spec.n_image_tokens = per_side * per_side
    return spec


class VisionSource:
    """A vision-language directory's vision tower and projector, under mmproj GGUF names."""

    def __init__(self, path: str | os.PathLike, config: dict | None = None):
        self.path = os.fspath(path)
        if config is None:
            cfg_path = os.path.join(self.path, "config.json")
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, ValueError) as e:
                raise QuantkitError(f"cannot read config.json ({type(e).__name__})", cfg_path) from None
        self.config = config
        why = unsupported_reason(config)
        if why is not None:
            raise QuantkitError(f"unsupported {why}", os.path.join(self.path, "config.json"),
                                "export the language model alone with --text-only")
        self.spec = vision_spec(self.path, config)
        self._files: dict[str, SafetensorsFile] = {}
        self._entries: dict[str, tuple[str, str]] = {}     # gguf name -> (file, hf name)
        self._shift: set[str] = set()                        # norms stored as 1 + w
        self._tmap = None
        self._index()

    # ------------------------------------------------------------------ names

    def _files_list(self) -> list[str]:
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise QuantkitError(f"cannot read the weight map ({type(e).__name__})", index) from None
            return [os.path.join(self.path, fn) for fn in files]
        files = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
        if not files:
            raise QuantkitError("no *.safetensors weights for the vision tower", self.path,
                                "convert the checkpoint to safetensors, or export the language model alone "
                                "with --text-only")
        return files

    def gguf_name(self, hf_name: str) -> str | None:
        """mmproj name of a checkpoint tensor; None for one that is not part of the vision half or
        that llama.cpp does not use. Raises QuantkitError for a vision tensor it does not know."""
        from gguf import MODEL_ARCH, get_tensor_name_map
        name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
        s = self.spec
        for p in _PROJ_PREFIXES:
            if name.startswith(p):
                rest = name[len(p):]
                if s.projector == "mlp":
                    table = {"linear_1.weight": "mm.0.weight", "linear_1.bias": "mm.0.bias",
                             "linear_2.weight": "mm.2.weight", "linear_2.bias": "mm.2.bias"}
                else:
                    table = {"mm_input_projection_weight": "mm.input_projection.weight",
                             "mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight"}
                if rest not in table:
                    raise QuantkitError(f"projector tensor {hf_name} has no llama.cpp counterpart", self.path)
                return table[rest]
        for p in _TOWER_PREFIXES:
            if name.startswith(p):
                rest = name[len(p):]
                break
        else:
            return None
        if rest.endswith("position_ids") or rest.startswith("head."):
            return None                    # buffers; SigLIP's pooling head (unused by the projectors)
        if rest.startswith("post_layernorm.") and s.projector == "mlp":
            return None                    # LLaVA takes hidden states from before the final norm
        if rest.startswith("encoder.layers."):
            idx = rest.split(".")[2]
            if idx.isdecimal() and int(idx) >= s.n_layer:
                return None                # past the deepest feature layer: never run
        if self._tmap is None:
            self._tmap = get_tensor_name_map(MODEL_ARCH.MMPROJ, s.n_layer_total)
        tmap = self._tmap
        base, dot, suffix = rest.rpartition(".")
        key = "vision_tower.vision_model." + (base if suffix in ("weight", "bias") else rest)
        mapped = tmap.get_name(key)
        if mapped is None:
            raise QuantkitError(f"vision tensor {hf_name} has no llama.cpp counterpart", self.path,
                                "export the language model alone with --text-only")
        return f"{mapped}.{suffix}" if suffix in ("weight", "bias") else mapped

    def _index(self) -> None:
        for fn in self._files_list():
            h = SafetensorsFile(fn)
            self._files[fn] = h
            for hf_name, e in h.entries.items():
                gname = self.gguf_name(hf_name)
                if gname is None:
                    continue
                if e.dtype not in _ST_TORCH:
                    raise QuantkitError(f"tensor {hf_name} has unsupported dtype {e.dtype}", fn)
                if gname in self._entries:
                    raise QuantkitError(f"tensor {gname} appears twice (second: {hf_name})", fn)
                self._entries[gname] = (fn, hf_name)
                if gname == "mm.soft_emb_norm.weight":
                    self._shift.add(gname)      # Gemma's RMSNorm computes x * (1 + w)
        need = ["v.patch_embd.weight", "v.position_embd.weight"] + [
            f"v.blk.{i}.{t}.weight" for i in range(self.spec.n_layer)
            for t in ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down", "ln1", "ln2")]
        need += ["mm.0.weight", "mm.2.weight"] if self.spec.projector == "mlp" else \
            ["mm.input_projection.weight", "mm.soft_emb_norm.weight", "v.post_ln.weight"]
        missing = [n for n in need if n not in self._entries]
        if missing:
            raise QuantkitError(f"the checkpoint has no vision tensor {missing[0]} ({len(missing)} missing)",
                                self.path, "the weights are incomplete, or export the language model alone "
                                           "with --text-only")

    # ------------------------------------------------------------------ tensors

    def names(self) -> list[str]:
        """mmproj tensor names in file order: embeddings, blocks in order, then the projector."""
        def key(n: str):
            if n.startswith("v.blk."):
                return (1, int(n.split(".")[2]), n)
            return (2 if n.startswith("mm.") else 0, 0, n)
        return sorted(self._entries, key=key)

    def shape(self, name: str) -> tuple[int, ...]:
        fn, hf_name = self._entries[name]
        return tuple(self._files[fn].entries[hf_name].shape)

    def hf_name(self, name: str) -> str:
        return self._entries[name][1]

    def load(self, name: str) -> torch.Tensor:
        """The tensor as float32, as llama.cpp wants its values."""
        fn, hf_name = self._entries[name]
        h = self._files[fn]
        e = h.entries[hf_name]
        buf = h.read(hf_name, e.begin, e.nbytes)
        t = torch.frombuffer(buf, dtype=_ST_TORCH[e.dtype]).reshape(e.shape).to(torch.float32) if buf \
            else torch.empty(e.shape)
        if name in self._shift:
            t = t + 1.0
        return t.contiguous()

    def close(self) -> None:
        for h in self._files.values():
            h.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def describe_vision(path: str | os.PathLike) -> dict[str, Any] | None:
    """What `quantkit inspect` says of a directory's vision tower: None for a text-only model (or
    not a directory); else its tower and projector type, whether quantkit writes it as an mmproj
    file (and if not, why, and that --text-only exports the language model alone)."""
    p = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(p):
        return None
    try:
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or vision_config(cfg) is None:
        return None
    vc = vision_config(cfg) or {}
    why = unsupported_reason(cfg)
    mt = cfg.get("model_type")
    out: dict[str, Any] = {"model_type": mt, "tower": vc.get("model_type"),
                           "projector": PROJECTORS.get(mt) if isinstance(mt, str) else None, "mmproj": why is None}
    if why is None:
        try:
            spec = vision_spec(os.fspath(path), cfg)
        except QuantkitError as e:
            out.update(mmproj=False, reason=str(e))
            return out
        out.update(layers=spec.n_layer, hidden=spec.n_embd, image_size=spec.image_size,
                   patch_size=spec.patch_size, image_tokens=spec.n_image_tokens)
    else:
        out["reason"] = f"unsupported {why}: export the language model alone with --text-only"
    return out


def language_model_names(hf_name: str) -> list[str]:
    """Where a causal language model's parameter (model.layers.0..., lm_head.weight) sits in a
    vision-language checkpoint, most likely first: as is, transformers 5's model.language_model.*,
    and the hub's language_model.model.* / language_model.lm_head.*."""
    if hf_name.startswith("model."):
        rest = hf_name[len("model."):]
        return [hf_name, "model.language_model." + rest, "language_model.model." + rest, "language_model." + rest]
    return [hf_name, "language_model." + hf_name, "model.language_model." + hf_name]
