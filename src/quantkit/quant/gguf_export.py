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
from ..models.imatrix_file import HOW_TO_MAKE
from .gguf_policy import FILE_TYPES, ModelFacts, TypePolicy, allows_quantization, requires_imatrix, tensor_order


def supported_file_types() -> list[str]:
    return [ft for ft, (_, t) in FILE_TYPES.items() if can_encode(t)]


def encode(type_name: str, x: torch.Tensor, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 tensor (row-major, rows along the last dim) -> GGUF bytes of `type_name`.
    `imatrix`: the tensor's importance weights, float32 [n_per_row] or, for a 3-D tensor of
    experts, [n_expert * n_per_row] (each expert's rows take their own slice, as llama-quantize
    does). Raises NonFiniteError on NaN/Inf (checked chunk by chunk while the data is in cache)."""
    q = qtype(type_name)
    n = x.shape[-1]
    if imatrix is not None and x.dim() == 3 and imatrix.size == x.shape[0] * n:
        w = torch.from_numpy(np.ascontiguousarray(imatrix, dtype=np.float32)).reshape(x.shape[0], n)
        return np.concatenate([q.quantize_rows(x[e], check_finite=True, imatrix=w[e]).numpy().reshape(-1)
                               for e in range(x.shape[0])])
    x2 = x.reshape(-1, n) if x.dim() != 1 else x.reshape(1, -1)
    qw = None if imatrix is None else torch.from_numpy(np.ascontiguousarray(imatrix, dtype=np.float32))
    return q.quantize_rows(x2, check_finite=True, imatrix=qw).numpy().reshape(-1)


def imatrix_metadata(imatrix, imatrix_path: str) -> dict:
    """The keys llama-quantize adds to a file made with --imatrix (tools/quantize: the file name
    as given and the first dataset, each cut to 127 bytes, the entry and chunk counts)."""
    from gguf import GGUFValueType

    from ..models.source import MetaValue

    def cut(s: str) -> str:
        return s.encode("utf-8")[:127].decode("utf-8", errors="ignore")
    out = {"quantize.imatrix.file": MetaValue(cut(imatrix_path), GGUFValueType.STRING)}
    if imatrix.datasets:
        out["quantize.imatrix.dataset"] = MetaValue(cut(imatrix.datasets[0]), GGUFValueType.STRING)
    out["quantize.imatrix.entries_count"] = MetaValue(len(imatrix.entries), GGUFValueType.UINT32)
    if imatrix.chunk_count > 0:
        out["quantize.imatrix.chunks_count"] = MetaValue(imatrix.chunk_count, GGUFValueType.UINT32)
    return out


@dataclass
class ExportReport:
    path: str
    file_type: str
    seconds: float
    n_bytes: int
    types: dict[str, str] = field(default_factory=dict)   # tensor -> type written


def plan_gguf(source: ModelSource, file_type: str = "q8_0", *, pure: bool = False,
              token_embedding_type: str | None = None, output_tensor_type: str | None = None, imatrix=None,
              calibrated: bool = False):
    """llama-quantize's choices for `source` at `file_type`: (tensor infos by name, [(name,
    shape, type)] in llama-quantize's tensor order). `imatrix` (models.imatrix_file.Imatrix):
    its presence changes some choices, as in llama-quantize; it must be the model's.
    `calibrated` (GPTQ, whose Hessians take the importance matrix's place): the decoder's
    matrices (2-D blk.* tensors, which GPTQ solves) may take the types that need one, and a file
    type llama.cpp makes only with one (IQ2_*, IQ1_*, IQ3_XXS, Q2_K_S) gets llama-quantize's
    choices with one, and so does every other IQ file type (IQ4_XS, IQ4_NL, IQ3_*: made with an
    importance matrix in practice, so GPTQ's file has the same tensor types and bytes as
    llama-quantize --imatrix's); every other file type keeps its round-to-nearest mix. Raises
    QuantkitError for a bad type, a type that needs an importance matrix without one, an
    importance matrix of another model."""
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
    # GPTQ onto a file type llama.cpp makes only with an importance matrix, or onto an IQ file type:
    # the with-imatrix mix
    needs = calibrated and (requires_imatrix("", FILE_TYPES[ft][1], ft) or ft.startswith("iq"))
    policy = TypePolicy(ft, names, facts, pure=pure,
                        token_embedding_type=token_embedding_type and token_embedding_type.lower(),
                        output_tensor_type=output_tensor_type and output_tensor_type.lower(),
                        has_imatrix=imatrix is not None or needs)
    if imatrix is not None:
        imatrix.check_model({n: tuple(i.shape) for n, i in infos.items()}, source.path)
    from ..models.gguf import GGUFSource
    is_gguf = isinstance(source, GGUFSource)
    plan = []
    for n in names:
        info = infos[n]
        src_type = info.type if is_gguf else "f32"
        target = policy.choose(n, info.shape, src_type)
        quantized = allows_quantization(n, len(info.shape)) and not (is_gguf and target == info.type)
        solved = calibrated and n.startswith("blk.") and len(info.shape) == 2
        if quantized and not solved and requires_imatrix(n, target, ft) and (imatrix is None or n not in imatrix.entries):
            what = "no importance matrix was given" if imatrix is None else "the importance matrix has no entry for it"
            raise QuantkitError(f"file type {ft} puts tensor {n} in {target}, which llama.cpp refuses to make "
                                f"without an importance matrix, and {what}", source.path,
                                f"{HOW_TO_MAKE}, then pass --imatrix imatrix.gguf")
        if not can_encode(target) and not (is_gguf and target == info.type):
            raise QuantkitError(f"tensor {n} needs type {target}, which quantkit cannot encode yet",
                                source.path, "use --pure or another file type")
        plan.append((n, info.shape, target))
    return infos, plan


def export_gguf(source: ModelSource, out: str | os.PathLike, file_type: str = "q8_0", *, pure: bool = False,
                token_embedding_type: str | None = None, output_tensor_type: str | None = None,
                show_progress: bool = True, precomputed: Callable[[str], np.ndarray | None] | None = None,
                plan: list | None = None, imatrix=None) -> ExportReport:
    """Write `source` as a GGUF of `file_type`, tensor by tensor. `precomputed(name)` may supply a
    tensor's bytes (GPTQ's, already on the tensor's target grid; None: encode it here).
    `imatrix` (models.imatrix_file.Imatrix, read from imatrix.path): every quantized tensor is
    encoded with its importance weights, as `llama-quantize --imatrix` does."""
    ft = file_type.lower()
    if plan is None:
        infos, plan = plan_gguf(source, ft, pure=pure, token_embedding_type=token_embedding_type,
                                output_tensor_type=output_tensor_type, imatrix=imatrix)
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
            return encode(target, x, imatrix.weights(name) if imatrix is not None else None)
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
                        on_tensor=written,
                        extra_metadata=imatrix_metadata(imatrix, imatrix.path) if imatrix is not None else None)
    finally:
        if bar:
            bar.close()
    return ExportReport(os.fspath(out), ft, time.perf_counter() - t0, os.path.getsize(out), targets)
