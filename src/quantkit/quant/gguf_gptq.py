"""GPTQ-compensated GGUF: GPTQ whose quantization grid is llama.cpp's own block format.

For every decoder linear whose llama.cpp type (chosen by llama-quantize's rules for the file
type, quant.gguf_policy) is a legacy block type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or a K-quant
(Q6_K .. Q2_K), GPTQ (quant.gptq) quantizes the weight onto exactly that type's grid, block by
block, and the codes are written as the type's bytes: a stock GGUF that llama.cpp runs at full
speed. Every other tensor (embeddings, output head, norms, and linears whose type has no GPTQ
grid) is written as llama-quantize writes it (quant.gguf_export).

Pipeline (quant.driver): the model's skeleton is built in transformers (float32) with only
the embeddings loaded; calibration text is tokenized with the model's own tokenizer (llama.cpp's
for a GGUF); blocks are loaded from the source one at a time, quantized (quant.pipeline) on
inputs produced by the already-quantized blocks before them, and released. This module's sink
spools the quantized tensors to a temporary file next to the output, so memory holds one
block's Hessians and solutions, not the whole quantized model; the GGUF is then written tensor
by tensor (temporary name, renamed when complete).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from ..recipe import DEFAULT_NSAMPLES, DEFAULT_SEQLEN
from ..models.arch import hf_to_gguf_name, permute_for_rope
from ..models.open import open_model
from ..util.errors import QuantkitError
from ..util.memory import map_large
from .driver import StreamingModel, quantize_blocks
from .gguf_export import ExportReport, export_gguf, plan_gguf
from .gptq import GPTQConfig
from .pipeline import PipelineConfig, PipelineReport

# the llama.cpp types GPTQ can solve for (quant.gptq grids)
GPTQ_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "iq4_nl", "iq4_xs",
              "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_s", "iq1_m")


@dataclass
class GGUFGPTQReport(ExportReport):
    gptq_seconds: float = 0.0
    n_gptq: int = 0                                       # linears solved by GPTQ
    damp: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per pipeline phase
    workers: list[dict] = field(default_factory=list)       # per Ray worker: peak RSS, seconds per phase
    experts: dict[str, dict] = field(default_factory=dict)  # per MoE layer: tokens per expert, safeguarded (quant.moe)


class Spool:
    """Quantized tensors on disk until the GGUF writer asks for them (one file, appended)."""

    def __init__(self, directory: str, final: str):
        self.final = final                  # the output the spool serves, named in a disk-full error
        self._f = tempfile.NamedTemporaryFile(dir=directory, prefix=".quantkit-gptq-", suffix=".spool", delete=False)
        self.path = self._f.name
        self.where: dict[str, tuple[int, int]] = {}

    def put(self, name: str, data: np.ndarray) -> None:
        from ..util.atomic import disk_full
        self.where[name] = (self._f.tell(), data.nbytes)
        try:
            self._f.write(np.ascontiguousarray(data).tobytes())
            self._f.flush()
        except OSError as e:
            err = disk_full(e, self.final)
            if err is not None:
                raise err from None
            raise

    def get(self, name: str) -> np.ndarray | None:
        """A fresh buffer read with pread. Not a memory map: a map's touched pages count in the
        process's RSS until it is unmapped, which made writing an 8 GB GGUF hold its whole 7.85 GB
        spool resident (8.05 GiB peak at 44 layers of 13B shapes, against 4.96 GiB for the solves)."""
        if name not in self.where:
            return None
        from ..util.memory import pread_into
        off, n = self.where[name]
        buf = np.empty(n, dtype=np.uint8)
        pread_into(self._f.fileno(), buf, off, f"{name} from the spool {self.path}")
        return buf

    def close(self) -> None:
        self._f.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class GGUFSink:
    """quant.driver sink: each block's GPTQ solutions, as llama.cpp type bytes (q/k rows
    permuted as the GGUF stores them), go to the spool; at the end the GGUF is written with
    every other tensor as llama-quantize writes it."""

    def __init__(self, src, out: str, file_type: str, plan, gptq: GPTQConfig, true_sequential: bool,
                 show_progress: bool, sums=None):
        self.src, self.out, self.file_type, self.plan = src, out, file_type, plan
        self.sums = sums                        # quant.imatrix.SquareSums: the inputs GPTQ calibrates on
        self.targets = {n: t for n, _, t in plan}
        self.gptq, self.true_sequential, self.show_progress = gptq, true_sequential, show_progress
        self.spool = Spool(os.path.dirname(os.path.abspath(out)) or ".", out)
        self.arch = None
        self.n_gptq = 0
        self.blocks_done = 0.0                  # perf_counter() when the last block was spooled
        self.result: ExportReport | None = None

    def gguf_name(self, hf_linear: str) -> str | None:
        try:
            return hf_to_gguf_name(self.arch, hf_linear + ".weight")
        except KeyError:
            return None

    def grid_for(self, hf_linear: str) -> str | None:
        """The llama.cpp type GPTQ solves this linear for (None: written as llama-quantize writes it)."""
        g = self.gguf_name(hf_linear)
        t = self.targets.get(g) if g else None
        return t if t in GPTQ_TYPES else None

    def pipeline_config(self, sm: StreamingModel) -> PipelineConfig:
        self.arch = sm.arch
        return PipelineConfig(method="gptq", grid=self.grid_for, gptq=self.gptq, true_sequential=self.true_sequential,
                              on_input=None if self.sums is None else self.seen)

    def seen(self, hf_linear: str, x) -> None:
        """An input a linear is calibrated on, into the importance matrix's sums (GGUF names)."""
        g = self.gguf_name(hf_linear)
        if g is not None:
            self.sums.add(g, x)

    def begin(self, sm: StreamingModel) -> None:
        """Nothing before the blocks: the exporter copies every other tensor from the source."""

    def block(self, index: int, prefix: str, layer, quantized: dict) -> None:
        spec = self.src.spec
        for hf_linear, qw in quantized.items():
            g = self.gguf_name(hf_linear)
            rows = qw.to_bytes()
            if self.arch.permute_qk and (".attn_q." in g or ".attn_k." in g):
                rows = permute_for_rope(rows, spec.n_head if ".attn_q." in g else spec.n_head_kv)
            self.spool.put(g, rows.contiguous().numpy().reshape(-1))
            self.n_gptq += 1

    def finish(self, report: PipelineReport) -> None:
        self.blocks_done = time.perf_counter()
        self.result = export_gguf(self.src, self.out, self.file_type, plan=self.plan, precomputed=self.spool.get,
                                  show_progress=self.show_progress)

    def close(self) -> None:
        """Removes the spool (also after an error or an interrupt)."""
        self.spool.close()


def export_gguf_gptq(model: str | os.PathLike | None, out: str | os.PathLike, file_type: str = "q4_0", *,
                     calib: str | None = None, nsamples: int = DEFAULT_NSAMPLES, seqlen: int = DEFAULT_SEQLEN,
                     gptq: GPTQConfig = GPTQConfig(), true_sequential: bool = True, pure: bool = False,
                     token_embedding_type: str | None = None, output_tensor_type: str | None = None,
                     show_progress: bool = True, ray=None, plan: list | None = None,
                     save_imatrix: str | os.PathLike | None = None) -> GGUFGPTQReport:
    """GPTQ-compensated GGUF of MODEL (a GGUF or Hugging Face directory; None: the bundled
    model) at llama.cpp `file_type`, calibrated on `calib` (any UTF-8 text; default wikitext-2
    valid), nsamples x seqlen tokens. `ray` (quant.distributed.RayOptions): the calibration
    split over Ray workers. `plan`: [(name, shape, type)] in file order, an explicit type per
    tensor (quant.budget's mixes) instead of llama-quantize's for `file_type`. `save_imatrix`:
    also write, as llama.cpp's imatrix (GGUF, or legacy for a .dat name), the importance matrix
    of the inputs GPTQ calibrated every decoder linear on: block 0's q/k/v inputs (all of block
    0's without true_sequential) are the float model's, as `quantkit imatrix` gives on the same
    tokens; the rest follow the already-quantized linears before them, as GPTQ sees them."""
    from ..util.atomic import check_writable_dir

    t0 = time.perf_counter()
    map_large()
    if nsamples <= 0 or seqlen <= 1:
        raise QuantkitError(f"need at least 1 sample of at least 2 tokens (got {nsamples} x {seqlen})",
                            hint="--nsamples N --seqlen L, e.g. 128 x 512")
    out = os.fspath(out)
    check_writable_dir(out)
    sums = None
    if save_imatrix is not None:
        if ray is not None:
            raise QuantkitError("an importance matrix from GPTQ is collected in one process; Ray workers "
                                "each see only their share", os.fspath(save_imatrix),
                                "leave out --ray, or make it with `quantkit imatrix`")
        from .imatrix import SquareSums
        check_writable_dir(os.fspath(save_imatrix))
        sums = SquareSums()
    src = open_model(model)
    try:
        if sums is not None and getattr(src.spec, "n_expert", 0):
            raise QuantkitError("an importance matrix from GPTQ records the dense linears only; the experts "
                                "are calibrated on their routed tokens", os.fspath(save_imatrix),
                                "make it with `quantkit imatrix MODEL --calib FILE -o FILE`")
        if plan is None:
            _, plan = plan_gguf(src, file_type, pure=pure, token_embedding_type=token_embedding_type,
                                output_tensor_type=output_tensor_type, calibrated=True)
        sink = GGUFSink(src, out, file_type, plan, gptq, true_sequential, show_progress, sums)
        try:
            report, _ = quantize_blocks(src, src.path, sink, calib=calib, nsamples=nsamples, seqlen=seqlen,
                                        show_progress=show_progress, ray=ray)
        finally:
            sink.close()
    finally:
        src.close()
    res = sink.result
    if sums is not None:
        from ..models.imatrix_file import save_imatrix as write_imatrix
        from .calib import default_calibration_file
        write_imatrix(sums.to_imatrix([os.fspath(calib or default_calibration_file())], nsamples, seqlen), save_imatrix)
    return GGUFGPTQReport(res.path, res.file_type, time.perf_counter() - t0, res.n_bytes, res.types,
                          sink.blocks_done - t0, sink.n_gptq, dict(report.damp), dict(report.phases),
                          list(report.workers), dict(report.experts))
