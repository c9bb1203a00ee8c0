"""The one driver behind every block-sequential export: a model source (GGUF or Hugging Face
directory) is built as a streaming transformers skeleton (quant.streaming), calibration text is
tokenized with the model's own tokenizer (quant.calib), and quant.pipeline's block loop
quantizes the decoder blocks one at a time into a sink:

    sink.pipeline_config(model)   method and grid per linear; checks the model can be written
                                  (before any calibration work)
    sink.begin(model)             tensors outside the decoder blocks
    sink.block(i, prefix, layer, quantized)   one block, as the loop finishes it (then freed)
    sink.finish(report)           the output, once every block is in

Sinks: the GPTQ-compensated GGUF (quant.gguf_gptq.GGUFSink) and the GPTQ / compressed-tensors
checkpoint (quant.checkpoint.CheckpointSink).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch
from torch import nn

from ..models.arch import HFArch
from ..util.errors import QuantkitError
from ..util.memory import trim
from .calib import calibration_ids
from .moe import expert_fetch, quantize_experts
from .pipeline import PipelineConfig, PipelineReport, decoder_layers, quantize_model
from .streaming import block_loader, compact_embeddings, row_reader, streaming_model


@dataclass
class StreamingModel:
    """What a sink sees of the model being quantized."""
    src: object                                        # models.gguf.GGUFSource | models.hf.HFSource
    path: str
    model: nn.Module | None                            # transformers skeleton (None once the blocks are done)
    arch: HFArch                                       # tensor names and per-architecture transforms
    fetch: Callable[[str], torch.Tensor | None]        # any tensor of the source by its HF name
    rows: Callable[[str, int, int], torch.Tensor]      # rows r0:r1 of a 2-D source tensor, by HF name
    lazy_embeddings: bool                              # the token embeddings are read from the source, never whole


class BlockSink(Protocol):
    def pipeline_config(self, sm: StreamingModel) -> PipelineConfig: ...

    def begin(self, sm: StreamingModel) -> None: ...

    def block(self, index: int, prefix: str, layer: nn.Module, quantized: dict) -> None: ...

    def finish(self, report: PipelineReport) -> None: ...


def quantize_blocks(src, path: str, sink: BlockSink, *, calib: str | None, nsamples: int, seqlen: int,
                    keep_model: bool = False, show_progress: bool = True,
                    ray=None) -> tuple[PipelineReport, nn.Module | None]:
    """Quantize the decoder blocks of `src` (opened from `path`) into `sink`, calibrated on
    `calib` (default wikitext-2 valid), nsamples x seqlen tokens (GPTQ only). Streaming: one
    decoder block in memory at a time, and the token embeddings never whole (keep_model: every
    block and the embeddings stay, dequantized in place, and the model is returned). `ray`
    (quant.distributed.RayOptions): GPTQ's calibration split over Ray workers."""
    if ray is not None and keep_model:
        raise QuantkitError("Ray workers quantize streaming, one block at a time; the model cannot be kept")
    n_expert = int(getattr(src.spec, "n_expert", 0) or 0)
    lazy = not keep_model
    model, tokenizer, arch, fetch = streaming_model(src, path, lazy_embeddings=lazy)
    if n_expert:                    # transformers' fused expert parameters from the per-expert tensors
        fetch = expert_fetch(fetch, n_expert, compact=not keep_model)   # bf16 where lossless: quantize_experts
    sm = StreamingModel(src, path, model, arch, fetch, row_reader(src, arch), lazy)
    pcfg = sink.pipeline_config(sm)
    if n_expert and pcfg.sparse_mlp is None:     # a sink may bring its own stage for the experts
        pcfg = replace(pcfg, sparse_mlp=quantize_experts)
    ids = calibration_ids(tokenizer, calib, nsamples, seqlen) if pcfg.method == "gptq" else None
    del tokenizer                   # done with; llama.cpp's vocabulary alone holds ~0.15 GB for Gemma-3
    gc.collect()
    sink.begin(sm)
    if lazy and ids is not None:    # block 0's inputs from only the embedding rows the calibration uses
        ids = compact_embeddings(model, sm.rows, ids)
    trim()
    load_block = block_loader(fetch, path)
    if keep_model:
        _, layers, prefix = decoder_layers(model)
        for i, layer in enumerate(layers):
            load_block(i, f"{prefix}.{i}", layer)
    if ray is not None:
        from .distributed import quantize_model_ray
        report = quantize_model_ray(model, ids, pcfg, path, ray, on_block=sink.block, load_block=load_block,
                                    show_progress=show_progress)
    else:
        report = quantize_model(model, ids, pcfg, on_block=sink.block, show_progress=show_progress,
                                load_block=None if keep_model else load_block)
    if not keep_model:              # the skeleton is spent: its memory goes before the sink's last writes
        sm.model = model = None
    sink.finish(report)
    return report, model
