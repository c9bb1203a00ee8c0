"""A quantized checkpoint (GPTQ, AWQ, compressed-tensors) -> GGUF, without a second rounding
where the grids allow it.

Per quantized linear, the llama.cpp type llama-quantize's rules give it (quant.gguf_policy) is
written by one of four paths:

    exact    the source grid is representable in the type: the codes and scales are written as
             they are (codecs.legacy.encode_from_codes), so llama.cpp's dequantized weights
             equal the checkpoint's (q - z) * s bit for bit. Q4_0 / Q5_0 / Q8_0 take any
             integer grid whose 32-column blocks share one fp16 scale and zero and whose q - z
             fits the type's signed codes (symmetric 4-bit with zero 8 -> Q4_0; any grid of up to
             8 bits -> Q8_0). Q4_1 / Q5_1 take a grid of up to 4 / 5 bits with d = s and the
             minimum m = -z * s rounded to fp16: equal within that rounding (the largest
             difference is reported; 0 for symmetric sources, where -8 s is an fp16 value).
    codes    K-quants (Q4_K, Q5_K, Q6_K, Q3_K) where the codes fit and the groups are whole
             sub-blocks: the checkpoint's codes are kept and only the block scales (and minima)
             are rounded onto the type's two-level scale grid (quant.convert_kquant); the largest
             relative scale error and value error (in the checkpoint's steps) are reported.
    gptq     no exact mapping (other K-quants and IQ types, groups not made of whole blocks, act-order
             with permuted groups, scales that are not fp16 values, FP8): GPTQ solves the
             dequantized weights onto the type's grid with a calibration Hessian
             (quant.gguf_gptq's sink, fed the checkpoint's weights as the float target).
    rtn      the type has no GPTQ grid: round to nearest from the dequantized weights.

Tensors stored as float (embeddings, norms, an unquantized head) are written as llama-quantize
writes them. `exact=True` refuses, in one line naming the tensors and why, instead of falling
back from the exact path.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..codecs import legacy
from ..models.arch import permute_for_rope
from ..models.quantized_source import QuantizedHFSource, SourceGrid, describe_config
from ..recipe import DEFAULT_NSAMPLES, DEFAULT_SEQLEN
from ..util.errors import QuantkitError
from ..util.memory import map_large
from ..util.progress import progress
from .convert_kquant import CODE_FORMATS, codes_blocks
from .driver import StreamingModel, quantize_blocks
from .gguf_export import export_gguf, plan_gguf
from .gguf_gptq import GPTQ_TYPES, GGUFSink
from .gptq import GPTQConfig
from .pipeline import PipelineConfig, PipelineReport

EXACT_FORMATS = {"q4_0": legacy.Q4_0, "q5_0": legacy.Q5_0, "q8_0": legacy.Q8_0, "q4_1": legacy.Q4_1,
                 "q5_1": legacy.Q5_1}
PATHS = ("exact", "codes", "gptq", "rtn", "float")


@dataclass
class ExactResult:
    data: np.ndarray | None           # the tensor's GGUF bytes (rows in the GGUF's order), None: not exact
    reason: str = ""                  # why not
    max_min_error: float = 0.0        # Q4_1 / Q5_1: largest |fp16(m) - m| over the blocks


def exact_blocks(grid: SourceGrid, type_name: str) -> ExactResult:
    """The bytes of `type_name` holding exactly the grid's weights (rows in HF order), or why not."""
    fmt = EXACT_FORMATS.get(type_name)
    if fmt is None:
        return ExactResult(None, f"{type_name.upper()} has no exact path from an integer grid (its block scales "
                                 "are themselves quantized)")
    if grid.q is None:
        return ExactResult(None, "FP8 values lie on no integer grid")
    out_f, in_f = grid.shape
    if in_f % legacy.BLOCK:
        return ExactResult(None, f"{in_f} input columns are not whole blocks of 32")
    if grid.act_order_permuted():
        return ExactResult(None, "act-order: the groups are permuted across the columns")
    s = grid.column_scales().reshape(out_f, -1, legacy.BLOCK)
    z = grid.column_zeros().reshape(out_f, -1, legacy.BLOCK)
    if not (torch.equal(s, s[..., :1].expand_as(s)) and torch.equal(z, z[..., :1].expand_as(z))):
        return ExactResult(None, f"group size {grid.group_size} is not a multiple of 32")
    d, zb = s[..., 0], z[..., 0]
    if not torch.equal(d.half().float(), d):
        return ExactResult(None, f"scales stored as {str(grid.scale_dtype).removeprefix('torch.')} are not fp16 values")
    q = grid.q.reshape(out_f, -1, legacy.BLOCK)
    if fmt.has_min:
        if fmt.levels < 2 ** grid.bits - 1:
            return ExactResult(None, f"{grid.bits}-bit codes do not fit {type_name.upper()}'s 0..{fmt.levels}")
        m = (-zb.float() * d)
        m16 = m.half().float()
        if not torch.isfinite(m16).all():
            return ExactResult(None, "the minimum -z*s overflows fp16")
        codes, err = q, float((m16 - m).abs().max()) if m.numel() else 0.0
        data = legacy.encode_from_codes(fmt, codes.reshape(-1, legacy.BLOCK), d.reshape(-1), m16.reshape(-1))
    else:
        codes = q - zb[..., None] + fmt.offset
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > fmt.levels):
            lo, hi = int((q - zb[..., None]).min()), int((q - zb[..., None]).max())
            return ExactResult(None, f"codes q - z span {lo}..{hi}, outside {type_name.upper()}'s "
                                     f"{-fmt.offset}..{fmt.levels - fmt.offset}")
        data, err = legacy.encode_from_codes(fmt, codes.reshape(-1, legacy.BLOCK), d.reshape(-1)), 0.0
    return ExactResult(data.reshape(out_f, -1), "", err)


@dataclass
class TensorPath:
    path: str                         # exact | codes | gptq | rtn | float
    type: str                         # llama.cpp type written
    note: str = ""                    # why not exact; the Q4_1 minimum's rounding; codes: the scales' error
    scale_error: float = 0.0          # codes: largest |d*sc - s| / s
    value_error: float = 0.0          # codes: largest |value - s*(c - z)| / s


@dataclass
class ConvertReport:
    path: str
    file_type: str
    seconds: float
    n_bytes: int
    source: dict
    tensors: dict[str, TensorPath] = field(default_factory=dict)
    max_min_error: float = 0.0
    n_gptq: int = 0

    @property
    def max_scale_error(self) -> float:
        """codes path: the largest relative scale rounding over its tensors."""
        return max((t.scale_error for t in self.tensors.values() if t.path == "codes"), default=0.0)

    @property
    def max_value_error(self) -> float:
        return max((t.value_error for t in self.tensors.values() if t.path == "codes"), default=0.0)

    @property
    def types(self) -> dict[str, str]:
        return {n: t.type for n, t in self.tensors.items()}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.path] = out.get(t.path, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"output": self.path, "file_type": self.file_type, "seconds": self.seconds,
                "file_bytes": self.n_bytes, "source": self.source, "paths": self.counts(),
                "max_min_error": self.max_min_error, "max_scale_error": self.max_scale_error,
                "max_value_error": self.max_value_error,
                "tensors": {n: {"path": t.path, "type": t.type, **({"note": t.note} if t.note else {})}
                            for n, t in self.tensors.items()}}


def _gguf_rows(src: QuantizedHFSource, name: str, rows: torch.Tensor) -> np.ndarray:
    """Byte rows in HF order -> the GGUF's order (llama's q/k rows permuted for rotary)."""
    spec = src.spec
    if src.hf_arch.permute_qk and (".attn_q." in name or ".attn_k." in name):
        rows = permute_for_rope(rows, spec.n_head if ".attn_q." in name else spec.n_head_kv)
    return rows.contiguous().numpy().reshape(-1)


def plan_paths(src: QuantizedHFSource, plan, exact: bool = False,
               keep_codes: bool = True, show_progress: bool = False) -> tuple[dict[str, TensorPath], dict, float]:
    """Each tensor's path, the exact (and codes-kept) tensors' bytes, and the largest minimum
    rounding. keep_codes False: K-quants are solved by GPTQ even where the codes would fit."""
    paths: dict[str, TensorPath] = {}
    exact_data: dict[str, np.ndarray] = {}
    worst = 0.0
    refused: dict[str, list[str]] = {}
    for name, _, target in progress(plan, desc="exact / codes-kept tensors", unit="tensor", disable=not show_progress):
        grid = src.grid(name)
        if grid is None:
            paths[name] = TensorPath("float", target)
            continue
        r = exact_blocks(grid, target)
        if r.data is not None:
            exact_data[name] = _gguf_rows(src, name, r.data)
            worst = max(worst, r.max_min_error)
            note = f"minimum within fp16 rounding (max {r.max_min_error:.3g})" if r.max_min_error else ""
            paths[name] = TensorPath("exact", target, note)
            continue
        refused.setdefault(r.reason, []).append(name)
        if keep_codes and target in CODE_FORMATS and not exact:
            c = codes_blocks(grid, target)
            if c.data is not None:
                exact_data[name] = _gguf_rows(src, name, c.data)
                paths[name] = TensorPath("codes", target, c.note(), c.max_scale_error, c.max_value_error)
                continue
            r.reason = c.reason
        solvable = target in GPTQ_TYPES and name.startswith("blk.")     # GPTQ's block loop: decoder linears
        paths[name] = TensorPath("gptq" if solvable else "rtn", target, r.reason)
    if exact and refused:
        n = sum(len(v) for v in refused.values())
        parts = [f"{', '.join(v[:3])}{f' and {len(v) - 3} more' if len(v) > 3 else ''}: {why}" for why, v in refused.items()]
        raise QuantkitError(f"--exact: {n} tensors cannot be written exactly ({'; '.join(parts)})", src.path,
                            "leave out --exact to solve them by GPTQ, or pick q4_0, q4_1 or q8_0")
    return paths, exact_data, worst


class ConvertSink(GGUFSink):
    """GGUFSink that solves only the tensors whose path is gptq; the exact ones' bytes come
    from the checkpoint's codes."""

    def __init__(self, *args, solve: set[str], exact_data: dict[str, np.ndarray], **kw):
        super().__init__(*args, **kw)
        self.solve, self.exact_data = solve, exact_data

    def grid_for(self, hf_linear: str) -> str | None:
        g = self.gguf_name(hf_linear)
        return self.targets.get(g) if g in self.solve else None

    def pipeline_config(self, sm: StreamingModel) -> PipelineConfig:
        self.arch = sm.arch
        return PipelineConfig(method="gptq", grid=self.grid_for, gptq=self.gptq, true_sequential=self.true_sequential)

    def finish(self, report: PipelineReport) -> None:
        self.blocks_done = time.perf_counter()

        def pre(name: str):
            return self.exact_data.get(name) if name in self.exact_data else self.spool.get(name)
        self.result = export_gguf(self.src, self.out, self.file_type, plan=self.plan, precomputed=pre,
                                  show_progress=self.show_progress)


def convert_to_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, file_type: str = "q4_0", *,
                    exact: bool = False, calib: str | None = None, nsamples: int = DEFAULT_NSAMPLES,
                    seqlen: int = DEFAULT_SEQLEN, gptq: GPTQConfig = GPTQConfig(), true_sequential: bool = True,
                    pure: bool = False, token_embedding_type: str | None = None,
                    output_tensor_type: str | None = None, keep_codes: bool = True,
                    show_progress: bool = True) -> ConvertReport:
    """A quantized checkpoint directory -> GGUF of `file_type`: exact where the grid allows it,
    the codes kept in K-quants (keep_codes), GPTQ onto the type's grid (calibrated on `calib`,
    nsamples x seqlen tokens) elsewhere."""
    from ..util.atomic import check_writable_dir

    t0 = time.perf_counter()
    map_large()
    out = os.fspath(out)
    check_writable_dir(out)
    src = QuantizedHFSource(os.fspath(model_dir))
    try:
        _, plan = plan_gguf(src, file_type, pure=pure, token_embedding_type=token_embedding_type,
                            output_tensor_type=output_tensor_type)
        paths, exact_data, worst = plan_paths(src, plan, exact, keep_codes, show_progress)
        solve = {n for n, p in paths.items() if p.path == "gptq"}
        if not solve:
            res = export_gguf(src, out, file_type, plan=plan, precomputed=exact_data.get,
                              show_progress=show_progress)
        else:
            sink = ConvertSink(src, out, file_type, plan, gptq, true_sequential, show_progress,
                               solve=solve, exact_data=exact_data)
            try:
                quantize_blocks(src, src.path, sink, calib=calib, nsamples=nsamples, seqlen=seqlen,
                                show_progress=show_progress)
            finally:
                sink.close()
            res = sink.result
        source = describe_config(src.qconfig)
    finally:
        src.close()
    return ConvertReport(res.path, res.file_type, time.perf_counter() - t0, res.n_bytes, source, paths, worst,
                         len(solve))
