"""A causal LM (Hugging Face directory or GGUF) -> GPTQ or compressed-tensors checkpoint
directory: the decoder linears quantized (RTN or GPTQ) by quant.driver's block loop, written
by this module's sink (models.gpu_formats.CheckpointWriter) block by block as they come.

A mixture of experts (Qwen3-MoE, Mixtral): GPTQ solves each expert on the tokens the model's
router sends it (quant.moe.quantize_experts: per-expert Hessians, starved experts
safeguarded and reported), RTN rounds each expert's matrices (`rtn_experts`); each expert is
written as its own linear under transformers' checkpoint names
(models.gpu_formats.expert_checkpoint_names), the router unquantized."""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..recipe import DEFAULT_NSAMPLES, DEFAULT_SEQLEN
from ..models.gguf import GGUFSource
from ..models.gguf_tokenizer import write_tokenizer
from ..models.gpu_formats import EXPERT_PARTS, CheckpointWriter, expert_checkpoint_names
from ..util.errors import QuantkitError
from ..util.finite import check_finite
from ..util.memory import map_large, trim
from .driver import StreamingModel, quantize_blocks
from .gptq import GPTQConfig
from .moe import ExpertStack, quantize_experts, sparse_mlp
from .pipeline import PipelineConfig, PipelineReport, decoder_layers, solve
from .rtn import QuantSpec
from .streaming import embedding_name


def grid_spec(fmt: str, bits: int, group_size: int, sym: bool, model_dtype: torch.dtype) -> QuantSpec:
    """The integer grid a GPU format can hold: GPTQ checkpoints store fp16 scales and (v1) zero
    points >= 1; compressed-tensors stores scales in the model's dtype."""
    if fmt == "gptq":
        return QuantSpec(bits, group_size, sym, torch.float16, zero_min=0 if sym else 1)
    return QuantSpec(bits, group_size, sym, model_dtype)


@dataclass
class GPUExportResult:
    output: str
    format: str
    method: str
    seconds: float
    file_bytes: int
    n_linear: int
    report: PipelineReport
    model: nn.Module | None = None      # the model with dequantized weights, when asked for


def _checkpoint_dtype(src, hf_config: dict) -> torch.dtype:
    """The dtype unquantized tensors keep in the checkpoint: the HF config's, or for a GGUF the
    token embedding's storage type (F32/F16/BF16; a quantized one: bfloat16)."""
    stored = hf_config.get("torch_dtype") or hf_config.get("dtype")
    if stored:
        return getattr(torch, str(stored), torch.float32)
    if isinstance(src, GGUFSource):
        t = next((t for t in src.tensors() if t.name == "token_embd.weight"), None)
        kind = t.type if t is not None else ""
        return {"f32": torch.float32, "f16": torch.float16}.get(kind, torch.bfloat16)
    return torch.float32


# GGUF general.architecture -> transformers model_type, where the two names differ
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}


def gguf_tokenizer_files(gguf_path: str, directory: str, arch: str | None = None) -> bool:
    """Tokenizer files for a checkpoint made from a GGUF, through transformers' GGUF tokenizer
    conversion. False (and nothing written) when transformers cannot convert this vocabulary.
    With the file's architecture known, the tokenizer class is named up front: otherwise
    AutoTokenizer first reads the whole file through gguf-py to build a model config, which
    takes ~20 s and ~0.8 GB for a 262k vocabulary; the class and the files are the same."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES
    model_type = _GGUF_MODEL_TYPES.get(arch, arch)
    named = {"tokenizer_type": model_type} if model_type and TOKENIZER_MAPPING_NAMES.get(model_type) else {}
    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                            gguf_file=os.path.basename(gguf_path), **named)
        tok.save_pretrained(directory)
        return True
    except Exception:  # noqa: BLE001 - optional: the weights are the checkpoint
        return False


def export_gpu_checkpoint(model_path: str, output: str, cfg, *, calib: str | None = None, nsamples: int = DEFAULT_NSAMPLES,
                          seqlen: int = DEFAULT_SEQLEN, shrink: float = 0.0, keep_model: bool = False,
                          show_progress: bool = True, ray=None) -> GPUExportResult:
    """Quantize a causal LM's decoder linears (RTN or GPTQ) and write a GPTQ or compressed-tensors
    checkpoint directory. `model_path`: a Hugging Face directory or a GGUF file (models.gguf_hf;
    its tensors dequantized to float32; calibrated with llama.cpp's tokenizer). `cfg`:
    models.gpu_formats.GPUFormatConfig. Embeddings, norms and the output head stay in the model
    dtype (fp16 for GPTQ). Streaming: one decoder block in memory at a time (keep_model: all of
    them, kept dequantized in the returned model). `ray` (quant.distributed.RayOptions): the
    calibration split over Ray workers."""
    from ..models.hf import HFSource
    from ..models.open import open_model
    from ..util.atomic import atomic_output

    t0 = time.perf_counter()
    map_large()
    model_path = os.fspath(model_path)
    if cfg.method not in ("rtn", "gptq"):
        raise QuantkitError(f"method '{cfg.method}' cannot write {cfg.format}", hint="use --method rtn or gptq")
    if os.path.isdir(model_path) and os.path.isfile(os.path.join(model_path, "config.json")):
        src = HFSource(model_path, tokenizer=False)        # calibration uses the directory's tokenizer
    else:
        src = open_model(model_path)
    try:
        with atomic_output(output, directory=True) as tmp:
            if isinstance(src, GGUFSource):   # first: its memory (~0.35 GB for a 262k vocabulary) is returned before the model's
                # llama.cpp's ids, and a tokenizer.model for SentencePiece vocabularies, so that
                # the checkpoint converts back to GGUF (quant.convert)
                write_tokenizer(src.metadata, tmp, model_path)
                gc.collect()
                trim()
            sink = CheckpointSink(tmp, cfg, shrink)
            report, model = quantize_blocks(src, model_path, sink, calib=calib, nsamples=nsamples, seqlen=seqlen,
                                            keep_model=keep_model, show_progress=show_progress, ray=ray)
    finally:
        src.close()
    size = sum(os.path.getsize(os.path.join(output, f)) for f in os.listdir(output))
    return GPUExportResult(os.path.abspath(output), cfg.format, cfg.method, time.perf_counter() - t0, size,
                           sink.n_linear, report, model)


class CheckpointSink:
    """quant.driver sink writing a GPTQ / compressed-tensors checkpoint into `directory`: the
    tensors outside the blocks first (the token embeddings and output head a chunk of rows at a
    time, straight from the source, unless the model is kept whole), then each block as it is
    quantized (one shard per block), then config.json, the index and the tokenizer files.
    `cfg`: models.gpu_formats.GPUFormatConfig."""

    def __init__(self, directory: str, cfg, shrink: float):
        self.dir, self.cfg, self.shrink = directory, cfg, shrink
        self.n_linear = 0
        self.writer: CheckpointWriter | None = None
        self.hf_config: dict = {}
        self.model_dtype = torch.float32
        self.from_gguf = False
        self.path = ""
        self.n_expert = 0
        self.ignore: list[str] = []        # compressed-tensors: the routers, unquantized
        self.moe_names: dict[str, tuple[dict, dict]] = {}   # sparse block -> expert_checkpoint_names

    def pipeline_config(self, sm: StreamingModel) -> PipelineConfig:
        cfg, model = self.cfg, sm.model
        self.from_gguf, self.path = isinstance(sm.src, GGUFSource), sm.path
        if self.from_gguf:
            self.hf_config = model.config.to_dict()
            self.hf_config["architectures"] = [type(model).__name__]
            self.hf_config.pop("_attn_implementation_autoset", None)
        else:
            with open(os.path.join(sm.path, "config.json"), encoding="utf-8") as f:
                self.hf_config = json.load(f)
        self.model_dtype = _checkpoint_dtype(sm.src, self.hf_config)
        _, layers, prefix = decoder_layers(model)
        _check_group_size(layers, prefix, cfg.group_size, sm.path)
        self.n_expert = int(getattr(sm.src.spec, "n_expert", 0) or 0)
        if self.n_expert and cfg.format == "compressed-tensors" and not cfg.sym:
            raise QuantkitError(f"compressed-tensors with zero points (-asym) of a mixture of experts "
                                f"({self.n_expert} experts): transformers dequantizes each expert without its zero "
                                "point", sm.path, "use a symmetric grid (w4g128), or --format gptq:w4g128-asym")
        experts = (rtn_experts if cfg.method == "rtn" else quantize_experts) if self.n_expert else None
        return PipelineConfig(method=cfg.method, true_sequential=cfg.true_sequential,
                              grid=grid_spec(cfg.format, cfg.bits, cfg.group_size, cfg.sym, self.model_dtype),
                              gptq=GPTQConfig(damp=cfg.damp, act_order=cfg.act_order, shrink=self.shrink,
                                              scale_search=cfg.scale_search), sparse_mlp=experts)

    def begin(self, sm: StreamingModel) -> None:
        """The tensors outside the decoder blocks, in a shard of their own."""
        model, path = sm.model, sm.path
        _, _, prefix = decoder_layers(model)
        embed_name = embedding_name(model)
        embed_shape = tuple(model.get_input_embeddings().weight.shape)
        tied = bool(self.hf_config.get("tie_word_embeddings", getattr(model.config, "tie_word_embeddings", False)))
        writer = self.writer = CheckpointWriter(self.dir, self.cfg, self.hf_config, self.model_dtype)
        for name, t in model.state_dict().items():
            if name.startswith(prefix + ".") or name == "lm_head.weight":
                continue
            if sm.lazy_embeddings and name == embed_name:
                writer.add_rows(name, embed_shape, lambda r0, r1: sm.rows(embed_name, r0, r1))
                continue
            check_finite(t, name, path)
            writer.add(name, t)
        if not tied and sm.lazy_embeddings:
            try:
                writer.add_rows("lm_head.weight", tuple(model.lm_head.weight.shape),
                                lambda r0, r1: sm.rows("lm_head.weight", r0, r1))
            except KeyError:            # a source without the head
                raise QuantkitError("the model has no output head (lm_head.weight)", path) from None
        elif not tied:
            head = sm.fetch("lm_head.weight")
            if head is None:
                raise QuantkitError("the model has no output head (lm_head.weight)", path)
            model.lm_head.weight.data = head
            writer.add("lm_head.weight", head)
            del head
        writer.flush()                  # the embeddings' shard
        if self.n_expert:
            self._name_experts(model)

    def _name_experts(self, model: nn.Module) -> None:
        """Every sparse block's checkpoint names (transformers' own, from its conversion mapping)
        and, for compressed-tensors, the routers' pattern in `ignore`."""
        _, layers, prefix = decoder_layers(model)
        for i, layer in enumerate(layers):
            if sparse_mlp(layer) is None:
                continue
            lp = f"{prefix}.{i}"
            keys = [k for k in layer.state_dict() if k not in _FUSED]
            self.moe_names[lp] = names, _ = expert_checkpoint_names(model, lp, keys, self.n_expert)
            router = names.get("mlp.gate.weight")
            if router is not None and self.cfg.format == "compressed-tensors":
                pattern = "re:.*" + router[len(lp) + 1:].removesuffix(".weight") + "$"
                if pattern not in self.ignore:
                    self.ignore.append(pattern)

    def block(self, index: int, prefix: str, layer: nn.Module, quantized: dict) -> None:
        state = layer.state_dict()
        stacks = {k: v for k, v in quantized.items() if isinstance(v, ExpertStack)}
        names, experts = self.moe_names.get(prefix, ({}, {}))
        if stacks:              # a sparse block: per-expert linears and the router, by transformers' names
            state = {k: v for k, v in state.items() if k not in _FUSED}
        for name, t in state.items():
            full = f"{prefix}.{name}"
            mod = full.rsplit(".", 1)[0]
            if mod in quantized and name.endswith(".weight"):
                continue
            self.writer.add(names.get(name, full), t)
        for mod, qw in quantized.items():
            if mod in stacks:
                part = mod.rsplit(".", 1)[1]
                for e, piece in enumerate(qw.parts):
                    self.writer.add_linear(experts[(part, e)], piece)
                    self.n_linear += 1
                continue
            self.writer.add_linear(mod, qw)
            self.n_linear += 1

    def finish(self, report: PipelineReport) -> None:
        self.writer.finish(None if self.from_gguf else self.path,
                           damp_raised={k: v for k, v in report.damp.items() if v > self.cfg.damp},
                           ignore=tuple(self.ignore))


_FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")     # a sparse block's fused expert parameters


@torch.no_grad()
def rtn_experts(layer: nn.Module, lp: str, hidden, kwargs: dict, cfg: PipelineConfig, report: PipelineReport,
                done: dict) -> bool:
    """The pipeline's `sparse_mlp` stage for round to nearest: each expert's gate, up and down
    matrices rounded onto cfg.grid (no calibration), their stored forms into `done`
    ({lp}.mlp.experts.{part}: quant.moe.ExpertStack), the fused parameters replaced by their
    dequantized values. False for a dense block."""
    mlp = sparse_mlp(layer)
    if mlp is None:
        return False
    gu, dn = mlp.experts.gate_up_proj.data, mlp.experts.down_proj.data
    inter = gu.shape[1] // 2
    stored: dict[str, list] = {p: [] for p in EXPERT_PARTS}
    for e in range(gu.shape[0]):
        for part, w in (("gate_proj", gu[e, :inter]), ("up_proj", gu[e, inter:]), ("down_proj", dn[e])):
            qw, deq, _, _ = solve(f"{lp}.mlp.experts.{e}.{part}", w, None, cfg.grid, cfg)
            w.copy_(deq)
            stored[part].append(qw)
    for part, parts in stored.items():
        done[f"{lp}.mlp.experts.{part}"] = ExpertStack(parts)
    return True


def _check_group_size(layers, prefix: str, group_size: int, model_path: str) -> None:
    """Every decoder linear's input features must be a whole number of groups (an expert's
    gate/up read the hidden state, its down the expert's intermediate state)."""
    if group_size == -1:
        return
    for i, layer in enumerate(layers):
        widths = [(name, mod.in_features) for name, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)]
        mlp = sparse_mlp(layer)
        if mlp is not None:
            widths += [(f"mlp.experts.{p}", int(w.shape[-1])) for p, w in
                       (("gate_up_proj", mlp.experts.gate_up_proj), ("down_proj", mlp.experts.down_proj))]
        for name, width in widths:
            if width % group_size:
                raise QuantkitError(f"group size {group_size} does not divide the {width} input features "
                                    f"of {prefix}.{i}.{name}", model_path,
                                    "choose a group size that divides it, or -1 for one scale per output channel")
