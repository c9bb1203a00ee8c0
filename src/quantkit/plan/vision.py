"""The vision half of a vision-language model, for the planner: what its mmproj file weighs, what
llama.cpp's image encoder allocates, and how many context positions an image takes.

Everything comes from config.json (models.vision.vision_spec): the tower's tensors are those
quant.mmproj writes (the layers up to the deepest feature layer, the projector), at the types
convert_hf_to_gguf.py --mmproj gives an F16 file (matrices F16; norms, biases and position
embeddings F32; Gemma-3's input projection F16).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..codecs.geometry import type_geometry
from ..models.vision import unsupported_reason, vision_config, vision_spec


@dataclass
class VisionPlan:
    kind: str                  # "clip" | "siglip"
    projector: str             # llama.cpp projector type: "mlp" | "gemma3"
    n_params: int
    mmproj_bytes: int          # the F16 mmproj file's tensors
    compute_bytes: int         # clip.cpp's compute buffer for one image (estimate)
    image_tokens: int          # context positions one image takes

    def to_dict(self) -> dict:
        return asdict(self)


def _tensors(spec) -> list[tuple[tuple[int, ...], str]]:
    """(shape, type) of every tensor of the F16 mmproj file."""
    h, f, t, p = spec.n_embd, spec.n_ff, spec.n_embd_text, spec.patch_size
    side = spec.image_size // p
    clip = spec.kind == "clip"
    out: list[tuple[tuple[int, ...], str]] = [
        ((h, 3, p, p), "f32" if spec.projector == "gemma3" else "f16"),
        ((side * side + (1 if clip else 0), h), "f32")]
    out += [((h,), "f32")] * (3 if clip else 1)              # class embedding + pre-norm | patch bias
    for _ in range(spec.n_layer):
        out += [((h, h), "f16")] * 4 + [((f, h), "f16"), ((h, f), "f16")]
        out += [((h,), "f32")] * 9 + [((f,), "f32")]
    if spec.projector == "mlp":
        out += [((t, h), "f16"), ((t,), "f32"), ((t, t), "f16"), ((t,), "f32")]
    else:
        out += [((h, t), "f16"), ((h,), "f32"), ((h,), "f32"), ((h,), "f32")]   # + post-norm
    return out


def vision_plan(cfg: dict, path: str = "") -> VisionPlan | None:
    """None for a text-only config or a vision tower llama.cpp cannot run."""
    if vision_config(cfg) is None or unsupported_reason(cfg) is not None:
        return None
    spec = vision_spec(path, cfg)
    ts = _tensors(spec)
    n_params = 0
    for shape, _ in ts:
        n = 1
        for s in shape:
            n *= s
        n_params += n
    n_pos = (spec.image_size // spec.patch_size) ** 2 + (1 if spec.kind == "clip" else 0)
    # float32 activations of one image: attention scores of every head, the block's widest
    # intermediates, the projector's output; twice for the graph allocator's overlap
    compute = 2 * 4 * (spec.n_head * n_pos * n_pos + n_pos * (4 * spec.n_embd + 2 * spec.n_ff)
                       + spec.n_image_tokens * 2 * spec.n_embd_text)
    return VisionPlan(spec.kind, spec.projector, n_params,
                      sum(type_geometry(ty).nbytes(shape) for shape, ty in ts), compute, spec.n_image_tokens)
