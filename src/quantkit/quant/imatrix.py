"""An importance matrix from quantkit's own forward pass: what llama-imatrix collects.

llama-imatrix (tools/imatrix/imatrix.cpp, collect_imatrix) hooks every matrix multiplication
whose weight is a `blk.*` tensor (the output head only with --process-output, which is off by
default; batches under 16 tokens are skipped) and adds, for every token of the batch, the square
of each input column's activation to that weight's running sum; the weight's count grows by the
number of tokens. Chunks are n_ctx tokens, the first replaced by BOS, each run on an empty KV
cache: quantkit's calibration chunks (quant.calib: BOS, then seqlen - 1 tokens of the text).

Here the same sums come from quantkit's block-sequential torch forward (quant.pipeline, method
"none": one decoder block in memory at a time), a forward pre-hook on each decoder linear
summing x² over the tokens in float64. Linears sharing an input (q/k/v, gate/up) get the same
statistics, as in llama.cpp. A mixture of experts' 3-D expert tensors get one row of sums and
one token count per expert, from the tokens the model's router sends each expert (as llama-imatrix
records its MUL_MAT_ID products). The result is a models.imatrix_file.Imatrix (GGUF or .dat).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..models.arch import hf_to_gguf_name
from ..models.imatrix_file import Imatrix, ImatrixEntry
from ..recipe import DEFAULT_NSAMPLES, DEFAULT_SEQLEN
from ..util.errors import QuantkitError
from ..util.memory import map_large, trim
from .calib import calibration_ids, default_calibration_file
from .moe import PARTS, expert_fetch, expert_inputs, sparse_mlp
from .pipeline import PipelineConfig, decoder_layers, quantize_model
from .streaming import block_loader, compact_embeddings, row_reader, streaming_model

MIN_TOKENS = 16          # llama-imatrix ignores matrix products over fewer tokens


@dataclass
class ImatrixReport:
    imatrix: Imatrix
    seconds: float
    tokens: int


class SquareSums:
    """Per GGUF weight name: the float64 sum over tokens of each input column's square, and the
    number of tokens. `hook(name)` is a forward pre-hook for the linear holding that weight."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._last: tuple | None = None      # (input, its version, its sums): linears sharing an input sum it once

    def add(self, name: str, x: torch.Tensor) -> None:
        if x.reshape(-1, x.shape[-1]).shape[0] < MIN_TOKENS:
            return
        if self._last is not None and self._last[0] is x and self._last[1] == x._version:
            s = self._last[2]
        else:
            x64 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            s = (x64 * x64).sum(dim=0)
            self._last = (x, x._version, s)
        x = x.reshape(-1, x.shape[-1])
        if name in self.sums:
            self.sums[name] += s
        else:
            self.sums[name] = s.clone()
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def hook(self, name: str):
        return lambda mod, inp: self.add(name, inp[0])

    def add_expert(self, name: str, n_expert: int, e: int, x: torch.Tensor) -> None:
        """Expert e's routed tokens x [tokens, n] into a 3-D expert tensor's statistics: one row of
        sums and one count per expert (every batch counts, as llama-imatrix's MUL_MAT_ID path)."""
        if name not in self.sums:
            self.sums[name] = torch.zeros(n_expert, x.shape[-1], dtype=torch.float64)
            self.counts[name] = np.zeros(n_expert)
        x64 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.sums[name][e] += (x64 * x64).sum(dim=0)
        self.counts[name][e] += x64.shape[0]

    def to_imatrix(self, datasets: list[str], chunk_count: int, chunk_size: int) -> Imatrix:
        imx = Imatrix(datasets=list(datasets), chunk_count=chunk_count, chunk_size=chunk_size)
        for name in sorted(self.sums):
            s = self.sums[name].to(torch.float32).numpy()
            s = s.reshape(1, -1) if s.ndim == 1 else s              # experts: [n_expert, n]
            if not np.isfinite(s).all():
                raise QuantkitError(f"the squared activations of {name} overflow float32",
                                    hint="the model's activations are not finite; check the model")
            imx.entries[name] = ImatrixEntry(s, np.asarray(self.counts[name], dtype=np.float64).reshape(-1))
        return imx


def hook_decoder_linears(model: nn.Module, arch, sums: SquareSums) -> list:
    """Forward pre-hooks summing the input squares of every linear of every decoder block,
    under the weight's GGUF name. Returns the hook handles."""
    _, layers, prefix = decoder_layers(model)
    handles = []
    for i, layer in enumerate(layers):
        for lname, mod in layer.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            gguf = hf_to_gguf_name(arch, f"{prefix}.{i}.{lname}.weight")
            if gguf is None:
                continue
            handles.append(mod.register_forward_pre_hook(sums.hook(gguf)))
        if (mlp := sparse_mlp(layer)) is not None:     # the router (a product llama-imatrix records too), the experts
            router = hf_to_gguf_name(arch, f"{prefix}.{i}.mlp.gate.weight")
            handles.append(mlp.gate.register_forward_pre_hook(sums.hook(router)))
            names = [hf_to_gguf_name(arch, f"{prefix}.{i}.mlp.experts.{p}.weight") for p in PARTS]
            handles.append(mlp.experts.register_forward_pre_hook(_expert_hook(sums, names)))
    return handles


def _expert_hook(sums: SquareSums, names: list[str]):
    """A forward pre-hook on a fused experts module (called as experts(x, top_k_index, top_k_weights)):
    each expert's gate/up inputs (its routed tokens) and down inputs, per expert."""
    gate, up, down = names

    def hook(mod, args):
        x, idx = args[0], args[1]
        n = mod.gate_up_proj.shape[0]
        for e, xe, xd in expert_inputs(mod, x, idx):
            for name in (gate, up):
                sums.add_expert(name, n, e, xe)
            sums.add_expert(down, n, e, xd)
    return hook


def compute_imatrix(src, path: str, *, calib: str | None = None, nsamples: int = DEFAULT_NSAMPLES,
                    seqlen: int = DEFAULT_SEQLEN, input_ids: torch.Tensor | None = None,
                    show_progress: bool = True) -> ImatrixReport:
    """The importance matrix of the model `src` (opened from `path`) over `calib` (default
    wikitext-2 valid), nsamples x seqlen tokens, or over `input_ids` [n, seqlen] given as they
    are (each row a chunk, BOS first as llama-imatrix makes them)."""
    t0 = time.perf_counter()
    map_large()
    model, tokenizer, arch, fetch = streaming_model(src, path, lazy_embeddings=True)
    if input_ids is None:
        input_ids = calibration_ids(tokenizer, calib, nsamples, seqlen)
    elif input_ids.dim() != 2 or input_ids.shape[1] < MIN_TOKENS:
        raise QuantkitError(f"token ids must be [chunks, at least {MIN_TOKENS}], got {tuple(input_ids.shape)}")
    del tokenizer
    gc.collect()
    n, ctx = input_ids.shape
    ids = compact_embeddings(model, row_reader(src, arch), input_ids)
    trim()
    sums = SquareSums()
    handles = hook_decoder_linears(model, arch, sums)
    n_expert = int(getattr(src.spec, "n_expert", 0) or 0)
    if n_expert:                    # transformers' fused expert parameters from the per-expert tensors
        fetch = expert_fetch(fetch, n_expert)
    try:
        quantize_model(model, ids, PipelineConfig(method="none"), show_progress=show_progress,
                       load_block=block_loader(fetch, path))
    finally:
        for h in handles:
            h.remove()
    imx = sums.to_imatrix([os.fspath(calib or default_calibration_file())], chunk_count=n, chunk_size=ctx)
    return ImatrixReport(imx, time.perf_counter() - t0, n * ctx)
