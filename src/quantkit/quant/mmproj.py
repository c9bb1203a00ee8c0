"""A vision-language model's vision tower and projector as llama.cpp's multimodal projector file.

The file (mmproj, general.architecture "clip", general.type "mmproj") is what llama.cpp's
multimodal runtime (tools/mtmd) loads beside the language model's GGUF: the clip.* /
clip.vision.* keys clip.cpp reads, the tensors under gguf-py's MODEL_ARCH.MMPROJ names
(models.vision), and per-tensor types chosen as convert_hf_to_gguf.py --mmproj chooses them:
norms, biases, 1-D tensors and position embeddings in F32; the patch embedding in F16 for an F16
file and F32 otherwise; Gemma-3's input projection always F16 and its embeddings F32; every other
weight in the file's type (Q8_0 falling back to F16 for rows that are not a multiple of 32).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
from gguf import GGUFValueType

from ..codecs.parallel import NonFiniteError
from ..codecs.registry import qtype
from ..models.gguf import write_gguf_file
from ..models.source import MetaValue
from ..models.vision import VisionSource, VisionSpec
from ..util.errors import QuantkitError
from ..util.finite import count_nonfinite, nonfinite_error
from ..util.progress import progress

MMPROJ_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 7}    # -> general.file_type (LlamaFileType)
# vision hidden_act -> the clip.cpp flag that selects it (none: GELU-quick, CLIP's quick_gelu)
_ACT_FLAGS: dict[str, str | None] = {"quick_gelu": None, "gelu": "clip.use_gelu",
                                     "gelu_pytorch_tanh": "clip.use_gelu", "gelu_new": "clip.use_gelu",
                                     "silu": "clip.use_silu"}


@dataclass
class MmprojReport:
    path: str
    type: str
    seconds: float
    n_bytes: int
    types: dict[str, str] = field(default_factory=dict)


def default_mmproj_path(output: str | os.PathLike) -> str:
    """mmproj-<name of the language model's file>, beside it."""
    out = os.path.abspath(os.fspath(output))
    return os.path.join(os.path.dirname(out), "mmproj-" + os.path.basename(out))


def mmproj_tensor_type(name: str, shape: tuple[int, ...], file_type: str, projector: str) -> str:
    """The type a tensor of an mmproj file of `file_type` is written in."""
    if projector == "gemma3":
        if name == "mm.input_projection.weight":
            return "f16"
        if name.startswith(("v.patch_embd.", "v.position_embd.")):
            return "f32"
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "f32"
    if name == "v.position_embd.weight":
        return "f32"
    if name == "v.patch_embd.weight":
        return "f16" if file_type == "f16" else "f32"
    if file_type == "q8_0" and shape[-1] % qtype("q8_0").block_size:
        return "f16"
    return file_type


def mmproj_metadata(spec: VisionSpec, name: str) -> dict[str, MetaValue]:
    """The clip.* keys clip.cpp reads for this tower and projector."""
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    m: dict[str, MetaValue] = {
        "general.type": MetaValue("mmproj", GGUFValueType.STRING),
        "general.name": MetaValue(name, GGUFValueType.STRING),
        "clip.has_vision_encoder": MetaValue(True, GGUFValueType.BOOL),
        "clip.projector_type": MetaValue(spec.projector, GGUFValueType.STRING),
        "clip.vision.projection_dim": MetaValue(spec.n_embd_text, u32),
        "clip.vision.image_size": MetaValue(spec.image_size, u32),
        "clip.vision.patch_size": MetaValue(spec.patch_size, u32),
        "clip.vision.embedding_length": MetaValue(spec.n_embd, u32),
        "clip.vision.feed_forward_length": MetaValue(spec.n_ff, u32),
        "clip.vision.block_count": MetaValue(spec.n_layer, u32),
        "clip.vision.attention.head_count": MetaValue(spec.n_head, u32),
        "clip.vision.attention.layer_norm_epsilon": MetaValue(spec.eps, f32),
        "clip.vision.image_mean": MetaValue(list(spec.image_mean), GGUFValueType.ARRAY, f32),
        "clip.vision.image_std": MetaValue(list(spec.image_std), GGUFValueType.ARRAY, f32),
    }
    if spec.hidden_act not in _ACT_FLAGS:
        raise QuantkitError(f"vision tower activation {spec.hidden_act!r} is not one llama.cpp runs",
                            hint="export the language model alone with --text-only")
    flag = _ACT_FLAGS[spec.hidden_act]
    if flag is not None:
        m[flag] = MetaValue(True, GGUFValueType.BOOL)
    if spec.feature_layers:
        m["clip.vision.feature_layer"] = MetaValue(list(spec.feature_layers), GGUFValueType.ARRAY,
                                                   GGUFValueType.INT32)
    if spec.projector == "gemma3" and spec.merge != 4:
        # llama.cpp assumes Gemma-3's 4x4 pooling unless told
        m["clip.vision.projector.scale_factor"] = MetaValue(spec.merge, u32)
    return m


def write_mmproj(src: VisionSource, out: str | os.PathLike, file_type: str = "f16", *,
                 show_progress: bool = True) -> MmprojReport:
    """Write `src` as an mmproj GGUF of `file_type` (f32, f16, q8_0); the file appears whole or not at all."""
    ft = file_type.lower()
    if ft not in MMPROJ_TYPES:
        raise QuantkitError(f"unknown mmproj type '{file_type}'", hint="--mmproj-type is one of "
                            + ", ".join(MMPROJ_TYPES))
    spec = src.spec
    plan = []
    for name in src.names():
        shape = src.shape(name)
        plan.append((name, shape, mmproj_tensor_type(name, shape, ft, spec.projector)))
    meta = mmproj_metadata(spec, os.path.basename(os.path.normpath(src.path)) or "model")
    total = sum(qtype(t).nbytes(s) for _, s, t in plan)
    targets = {n: t for n, _, t in plan}

    def produce(name: str) -> np.ndarray:
        x = src.load(name)
        x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 1 else x.reshape(1, -1)
        try:
            return qtype(targets[name]).quantize_rows(x2, check_finite=True).numpy().reshape(-1)
        except NonFiniteError:
            raise nonfinite_error(src.hf_name(name), count_nonfinite(x), src.path) from None

    t0 = time.perf_counter()
    bar = progress(total=total, desc=f"mmproj {ft}", unit="B", unit_scale=True, disable=not show_progress)
    try:
        write_gguf_file(out, "clip", meta, plan, produce, file_type=MMPROJ_TYPES[ft],
                        on_tensor=lambda _n, nb: bar.update(nb))
    finally:
        bar.close()
    return MmprojReport(os.fspath(out), ft, time.perf_counter() - t0, os.path.getsize(out), targets)


def read_config(model) -> dict | None:
    """config.json of a Hugging Face directory, None for anything else (a .gguf, the bundled model)."""
    import json
    if model is None or not os.path.isdir(os.fspath(model)):
        return None
    p = os.path.join(os.fspath(model), "config.json")
    try:
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None          # the language model's reader names what is wrong with it
    return cfg if isinstance(cfg, dict) else None


def prepare_mmproj(model, output, mmproj: str | os.PathLike | None = None, mmproj_type: str = "f16",
                   text_only: bool = False) -> tuple[VisionSource, str] | None:
    """Before anything is written: the vision half of `model` and where its mmproj file goes, or
    None (a text-only model, or text_only=True). Refuses, in one line, a vision tower llama.cpp
    cannot run (naming --text-only), a bad --mmproj-type, and --mmproj for a text-only model."""
    from ..models.vision import unsupported_reason, vision_config
    from ..util.atomic import check_output
    if mmproj_type.lower() not in MMPROJ_TYPES:
        raise QuantkitError(f"unknown --mmproj-type '{mmproj_type}'", hint="use one of " + ", ".join(MMPROJ_TYPES))
    cfg = read_config(model)
    if cfg is None or vision_config(cfg) is None:
        if mmproj is not None:
            raise QuantkitError("the model has no vision tower to write", os.fspath(model or "bundled model"),
                                "leave out --mmproj")
        return None
    if text_only:
        if mmproj is not None:
            raise QuantkitError("--mmproj and --text-only contradict each other", hint="give one of them")
        return None
    why = unsupported_reason(cfg)
    if why is not None:
        raise QuantkitError(f"unsupported {why}; the language model can be exported alone",
                            os.path.join(os.fspath(model), "config.json"), "add --text-only")
    path = os.fspath(mmproj) if mmproj is not None else default_mmproj_path(output)
    if os.path.abspath(path) == os.path.abspath(os.fspath(output)):
        raise QuantkitError("--mmproj is the same file as -o", path, "give the projector its own file")
    check_output(path, [model], flag="--mmproj")
    return VisionSource(model, cfg), path
