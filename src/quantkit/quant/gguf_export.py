"""Model -> GGUF of a llama.cpp file type, one tensor at a time (round-to-nearest, llama.cpp-exact)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..codecs.parallel import NonFiniteError
from ..codecs.registry import can_encode, qtype
from ..models.gguf import write_gguf_file
from ..models.source import ModelSource
from ..util.errors import QuantkitError
from ..util.finite import count_nonfinite, nonfinite_error
from ..util.progress import progress
from .gguf_policy import FILE_TYPES, ModelFacts, TypePolicy, tensor_order


def supported_file_types() -> list[str]:
    return [ft for ft, (_, t) in FILE_TYPES.items() if can_encode(t)]


def encode(type_name: str, x: torch.Tensor) -> np.ndarray:
    """float32 tensor (row-major, rows along the last dim) -> GGUF bytes of `type_name`.
    Raises NonFiniteError on NaN/Inf (checked chunk by chunk while the data is in cache)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 1 else x.reshape(1, -1)
    return qtype(type_name).quantize_rows(x2, check_finite=True).numpy().reshape(-1)


@dataclass
class ExportReport:
    path: str
    file_type: str
    seconds: float
    n_bytes: int
    types: dict[str, str] = field(default_factory=dict)   # tensor -> type written


def plan_gguf(source: ModelSource, file_type: str = "q8_0", *, pure: bool = False,
              token_embedding_type: str | None = None, output_tensor_type: str | None = None):
    """llama-quantize's choices for `source` at `file_type`: (tensor infos by name, [(name,
    shape, type)] in llama-quantize's tensor order). Raises QuantkitError for a bad type."""
    ft = file_type.lower()
    if ft not in FILE_TYPES:
        raise QuantkitError(f"unknown GGUF file type '{file_type}'",
                            hint="choose one of " + ", ".join(supported_file_types()))
    for t in (token_embedding_type, output_tensor_type):
        if t is not None and not can_encode(t):
            raise QuantkitError(f"unknown or unsupported tensor type '{t}'",
                                hint="f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q6_k, q5_k, q4_k, q3_k, q2_k")
    infos = {t.name: t for t in source.tensors()}
    names = tensor_order(list(infos))
    s = source.spec
    facts = ModelFacts(arch=s.arch, n_layer=s.n_layer, n_head=s.n_head, n_head_kv=s.n_head_kv, n_expert=s.n_expert)
    policy = TypePolicy(ft, names, facts, pure=pure,
                        token_embedding_type=token_embedding_type and token_embedding_type.lower(),
                        output_tensor_type=output_tensor_type and output_tensor_type.lower())
    from ..models.gguf import GGUFSource
    is_gguf = isinstance(source, GGUFSource)
    plan = []
    for n in names:
        info = infos[n]
        src_type = info.type if is_gguf else "f32"
        target = policy.choose(n, info.shape, src_type)
        if not can_encode(target) and not (is_gguf and target == info.type):
            raise QuantkitError(f"tensor {n} needs type {target}, which quantkit cannot encode yet",
                                source.path, "use --pure or another file type")
        plan.append((n, info.shape, target))
    return infos, plan


def export_gguf(source: ModelSource, out: str | os.PathLike, file_type: str = "q8_0", *, pure: bool = False,
                token_embedding_type: str | None = None, output_tensor_type: str | None = None,
                show_progress: bool = True, precomputed: Callable[[str], np.ndarray | None] | None = None,
                plan: list | None = None) -> ExportReport:
    """Write `source` as a GGUF of `file_type`, tensor by tensor. `precomputed(name)` may supply a
    tensor's bytes (GPTQ's, already on the tensor's target grid; None: encode it here)."""
    ft = file_type.lower()
    if plan is None:
        infos, plan = plan_gguf(source, ft, pure=pure, token_embedding_type=token_embedding_type,
                                output_tensor_type=output_tensor_type)
    else:
        infos = {t.name: t for t in source.tensors()}
    from ..models.gguf import GGUFSource
    is_gguf = isinstance(source, GGUFSource)
    s = source.spec
    targets = {n: t for n, _, t in plan}
    total = sum(qtype(t).nbytes(shp) for _, shp, t in plan)

    def produce(name: str) -> np.ndarray:
        info, target = infos[name], targets[name]
        if precomputed is not None:
            data = precomputed(name)
            if data is not None:
                return data
        if is_gguf and target == info.type:
            raw, _ = source.raw(name)
            return raw
        x = source.load(name)
        if x.shape[-1] % qtype(target).block_size:
            raise QuantkitError(f"tensor {name}: rows of {x.shape[-1]} values do not divide into "
                                f"{target} blocks of {qtype(target).block_size}", source.path)
        try:
            return encode(target, x)
        except NonFiniteError:
            raise nonfinite_error(name, count_nonfinite(x), source.path) from None

    def written(name: str, nbytes: int) -> None:
        source.release(name)
        if bar:
            bar.update(nbytes)

    t0 = time.perf_counter()
    bar = progress(total=total, desc=f"GGUF {ft}", unit="B", unit_scale=True) if show_progress else None
    try:
        write_gguf_file(out, s.arch, source.metadata, plan, produce, file_type=int(FILE_TYPES[ft][0]),
                        on_tensor=written)
    finally:
        if bar:
            bar.close()
    return ExportReport(os.fspath(out), ft, time.perf_counter() - t0, os.path.getsize(out), targets)
