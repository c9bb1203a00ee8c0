"""Memory a model needs: weights, KV cache, compute buffers, runtime overhead, training state.

Pure arithmetic on a ModelShape. Each function returns bytes (ints); the constants that are
estimates rather than exact sizes are named here with where they come from. Footnote keys
([kv-swa], [zero], ...) refer to FOOTNOTES, which the CLI prints under its table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..codecs.geometry import type_geometry
from ..util.errors import QuantkitError
from . import formats
from .model import ModelShape, Tensor

MIB = 1 << 20
GIB = 1 << 30

# llama.cpp pads the context to 256 cells and sizes the sliding-window cache as
# PAD(min(n_ctx, n_swa * n_seq + n_ubatch), 256)          [kv-swa]
KV_PAD = 256
N_UBATCH = 512          # llama.cpp / llama-cpp-python default physical batch

# Runtime overheads that are not tensors: estimates, replaced by measurement in BENCHMARKS.md.
# llama.cpp on CPU: the process itself. Measured: RSS of a Python process after
# `import llama_cpp`, before loading a model, 44.0 MB (benchmarks/plan_vs_measured.py).
LLAMACPP_CPU_BASE = 46_768_128
# A CUDA context with cuBLAS workspace typically holds 250-500 MiB of VRAM; we plan 400 MiB.
CUDA_CONTEXT = 400 * MIB
# torch on CPU: RSS of a process that has imported torch, transformers, quantkit's runtime and the
# transformers modules that building a model imports (modeling_utils, the model class, masking_utils):
# 388.6 MB measured by benchmarks/plan_torch_rss.py (torch + transformers alone: 250 MB; transformers
# imports its modeling code lazily, on first use, which adds 138 MB).
TORCH_CPU_BASE = 371 * MIB
# glibc malloc on 64-bit Linux: M_MMAP_THRESHOLD starts at 128 KiB and rises to the size of each
# mmap'd chunk freed, up to DEFAULT_MMAP_THRESHOLD_MAX = 32 MiB; M_TRIM_THRESHOLD follows at twice
# that, 64 MiB (glibc malloc/malloc.c, mallopt(3)). Once loading has freed dequantization temporaries
# of a few MiB, blocks below the threshold come from the heap, and the heap gives memory back only
# when more than M_TRIM_THRESHOLD is free at its top. So the heap keeps up to 64 MiB of freed
# memory resident: measured with mallinfo2() at 65-89 MB free heap at the load peak and 89-115 MB
# after loading (benchmarks/results/plan_torch_rss.json). [glibc]
GLIBC_MMAP_THRESHOLD_MAX = 32 * MIB
GLIBC_TRIM_THRESHOLD = 2 * GLIBC_MMAP_THRESHOLD_MAX
# quantkit's GGUF reader (quantkit.models.gguf_file) while the file is open: the header's file
# pages, the token strings' payload copied into a bytes object, the scores and token types as Python
# lists (float object 24 B + 2 list slots 16 B), the tensor table: 27.5 MB for Gemma-3's 262144
# tokens measured (the listed parts account for 21 MB), 105 bytes per token.
GGUF_READER_BYTES_PER_TOKEN = 105

FOOTNOTES = {
    "kv-swa": "llama.cpp src/llama-kv-cache-iswa.cpp: sliding-window layers get their own cache of "
              "PAD(min(n_ctx, n_swa*n_seq + n_ubatch), 256) cells unless swa_full is set "
              "(github.com/ggml-org/llama.cpp); transformers keeps the window for Gemma-2/3 sliding layers.",
    "kv-q": "Quantized KV rows use the GGML block layout (q8_0: 34 bytes per 32 values, q4_0: 18 per 32): "
            "quantkit.codecs.geometry; llama.cpp needs flash attention for a quantized V cache.",
    "mix": "GGUF mixes: quantkit.quant.gguf_policy, llama.cpp's src/llama-quant.cpp rules (llama_tensor_get_type_impl, "
           "tensor_type_fallback), checked tensor by tensor against the bundled Gemma-3-270M Q4_K_M file.",
    "gptq": "GPTQ packing as AutoGPTQ/GPTQModel store it: qweight int32 [in*bits/32, out], qzeros int32 "
            "[groups, out*bits/32], scales fp16 [groups, out], g_idx int32 [in] (Frantar et al. 2022, "
            "arXiv:2210.17323).",
    "compute": "llama.cpp compute buffer: the largest of the logits stage (n_ubatch x n_vocab x 4 B), the "
               "attention stage (n_head x n_kv x n_ubatch x 4 B of scores without flash attention) and the FFN stage "
               "(3 x n_ff x n_ubatch x 4 B): ggml's allocator reuses memory between stages.",
    "zero": "Mixed-precision Adam holds 16 bytes per parameter: fp16 weights (2) + fp16 gradients (2) + fp32 "
            "master weights, momentum and variance (12). Rajbhandari et al., ZeRO, arXiv:1910.02054, sec. 3.1. "
            "Hugging Face's 'Model training anatomy' counts 18 (fp32 gradients).",
    "act": "Activations per layer and token: the tensors autograd saves in a pre-norm block with fused "
           "(memory-efficient) attention, 2 bytes each: 2(4h + 2h_q + 2h_kv + 4f) for a gated MLP. Korthikanti "
           "et al., arXiv:2205.05198, sec. 4.1 give 34h (+5as/h with unfused attention) for GPT blocks. Full "
           "gradient checkpointing keeps only each layer's input (2h) and recomputes one layer at a time.",
    "lora": "LoRA adds r(d_in + d_out) trainable parameters per adapted matrix, trained with Adam (16 B/param); "
            "the base stays frozen in 16-bit. Hu et al., arXiv:2106.09685.",
    "qlora": "QLoRA: NF4 base weights, 4 bits + one absmax per 64 weights; double quantization stores the "
             "absmax in 8 bits with one fp32 per 256 blocks, 0.127 bits/param instead of 0.5; paged optimizers "
             "move optimizer state to CPU RAM on memory spikes. Dettmers et al., arXiv:2305.14314, sec. 3.",
    "cpu-speed": "Calibrated on this machine by benchmarks/plan_speed_calibrate.py: least squares over random llama "
                 "models (two shapes, every GGUF type, pure), checked on Gemma-3-270M's llama.cpp mixes; BENCHMARKS.md, Plan.",
    "glibc": "glibc malloc: dynamic mmap threshold up to 32 MiB (DEFAULT_MMAP_THRESHOLD_MAX), heap trimmed only "
             "above M_TRIM_THRESHOLD = 2 x that = 64 MiB of free top (glibc malloc/malloc.c, mallopt(3)); measured "
             "with mallinfo2() by benchmarks/plan_torch_rss.py.",
    "eager": "transformers eager attention (eager_attention_forward): scores = matmul(q, k^T) * scaling, + mask, "
             "softmax: two [n_head, n, n] fp32 tensors live at each step; the returned weights are kept by the "
             "decoder layer (`hidden_states, _ = self.self_attn(...)`) through its MLP; one additive fp32 mask "
             "[n, n] per layer type (full, sliding) lives through all layers.",
    "speed": "Decoding reads every weight once per token (MoE: the active experts) plus the KV cache of the "
             "context so far, so tokens/s <= bandwidth / bytes read per token. Prompt processing is compute-"
             "bound: 2 FLOPs per weight per token plus 2 n_layer n_ctx d_attn (Kaplan et al., arXiv:2001.08361, "
             "table 1).",
}


def check_range(name: str, v: int, lo: int, hi: int) -> int:
    """`v` if it is an integer in [lo, hi]; otherwise a one-line error naming the option."""
    if not isinstance(v, int) or isinstance(v, bool) or not (lo <= v <= hi):
        raise QuantkitError(f"{name} {v} is out of range", hint=f"give an integer between {lo} and {hi}")
    return v


def pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


# ---------------------------------------------------------------- KV cache

@dataclass
class KVCache:
    kv_type: str
    cells_full: int              # cells of a full-attention layer (all sequences)
    cells_swa: int               # cells of a sliding-window layer (all sequences)
    n_full_layers: int
    n_swa_layers: int
    bytes_per_cell_layer: int    # K + V of one token in one layer
    per_layer: list[int]         # bytes, layer by layer
    total: int
    swa_full: bool = False       # sliding-window layers keep the full context (no window cache)

    def to_dict(self) -> dict:
        return asdict(self)


def kv_row_bytes(m: ModelShape, kv_type: str) -> int:
    """Bytes of K plus V of one token in one layer."""
    try:
        t = type_geometry(kv_type)
    except KeyError:
        raise QuantkitError(f"unknown KV cache type '{kv_type}'", hint="f16, q8_0 or q4_0") from None
    n = m.n_embd_k_gqa
    if n % t.block_size:
        raise QuantkitError(f"KV type {kv_type} needs rows of a multiple of {t.block_size} values; "
                            f"this model's K rows hold {n}", hint="use --kv-type f16")
    return 2 * t.row_bytes(n)


def kv_cache(m: ModelShape, n_ctx: int, batch: int = 1, kv_type: str = "f16", runtime: str = "llama.cpp",
             swa_full: bool = False, n_ubatch: int = N_UBATCH) -> KVCache:
    """The KV cache as the runtime allocates it for `batch` sequences of `n_ctx` tokens each."""
    check_range("--ctx", n_ctx, 1, 16 * 1024 * 1024)
    check_range("--batch", batch, 1, 65536)
    if runtime == "torch" and kv_type not in ("f16", "bf16"):
        raise QuantkitError(f"--kv-type {kv_type} is for llama.cpp; the torch runtime keeps a 16-bit cache",
                            hint="use --runtime llama.cpp or --kv-type f16")
    row = kv_row_bytes(m, kv_type)
    swa = m.swa_layers()
    if runtime == "llama.cpp":
        ctx = pad(n_ctx, KV_PAD)
        cells_full = ctx * batch
        if swa_full or not any(swa):
            cells_swa = cells_full
        else:   # one stream per sequence (kv_unified = false): window + ubatch per stream
            cells_swa = batch * pad(min(ctx, m.sliding_window + min(n_ubatch, ctx)), KV_PAD)
            cells_swa = min(cells_swa, cells_full)
    else:
        cells_full = n_ctx * batch
        cells_swa = batch * min(n_ctx, m.sliding_window or n_ctx)
    per_layer = [row * (cells_swa if s else cells_full) for s in swa]
    return KVCache(kv_type, cells_full, cells_swa, sum(1 for s in swa if not s), sum(1 for s in swa if s),
                   row, per_layer, sum(per_layer), swa_full)


# ---------------------------------------------------------------- compute buffers, overhead

def llamacpp_compute(m: ModelShape, n_ctx: int, batch: int = 1, flash_attn: bool = False,
                     n_ubatch: int = N_UBATCH) -> int:
    """Estimate of llama.cpp's compute buffer (ggml graph reserved for one ubatch) [compute]."""
    ub = min(n_ubatch, pad(n_ctx, KV_PAD) * batch)
    n_kv = pad(n_ctx, KV_PAD)          # a sequence attends to its own stream
    act = ub * m.n_embd * 4
    stage_out = ub * m.n_vocab * 4 + 2 * act
    qkv = ub * (m.n_head + 2 * m.n_head_kv) * m.head_dim * 4
    if flash_attn:
        stage_attn = qkv + ub * m.n_head * m.head_dim * 4 + 2 * act
    else:
        # KQ scores in f32; ggml-alloc runs the softmax in place on them
        stage_attn = ub * n_kv * m.n_head * 4 + qkv + 2 * act
    stage_ffn = 3 * ub * m.n_ff * 4 + 2 * act
    return max(stage_out, stage_attn, stage_ffn)


def llamacpp_output_buffer(m: ModelShape, batch: int = 1) -> int:
    """Host buffer for the logits of the last token of each sequence (f32)."""
    return m.n_vocab * 4 * batch


def torch_compute(m: ModelShape, n_ctx: int, batch: int = 1) -> int:
    """Peak activations of a 16-bit forward pass over the whole prompt (no grad): hidden states
    and one MLP's intermediates, plus fp32 logits of the last position (transformers' generate)."""
    tokens = n_ctx * batch
    return tokens * (4 * m.n_embd + 3 * m.n_ff) * 2 + batch * m.n_vocab * 4 * 2


def overhead(runtime: str, gpu: bool) -> int:
    if gpu:
        return CUDA_CONTEXT
    return LLAMACPP_CPU_BASE if runtime == "llama.cpp" else TORCH_CPU_BASE


# ---------------------------------------------------------------- inference total

@dataclass
class Inference:
    format: str
    runtime: str
    weights: int
    kv: int
    compute: int
    output: int
    overhead_cpu: int
    per_layer: list[int]           # weights + KV of each repeating layer (for partial offload)
    non_layer: int                 # token embedding, output head, final norm
    output_head: int               # bytes of the output matrix (offloaded as one more "layer")
    kv_detail: KVCache
    repack: int = 0                # llama.cpp CPU: repacked copies of q4_0/q4_k/iq4_nl tensors
    vision: int = 0                # vision-language model: the F16 mmproj file + its image compute buffer

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.output + self.overhead_cpu + self.vision

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        d.pop("per_layer")
        return d


def inference(m: ModelShape, fmt, n_ctx: int, batch: int = 1, kv_type: str = "f16",
              runtime: str | None = None, swa_full: bool = False, flash_attn: bool = False,
              tensors: list[Tensor] | None = None) -> Inference:
    f = formats.parse_format(fmt) if isinstance(fmt, str) else fmt
    rt = runtime or f.runtime
    if rt == "llama.cpp" and f.family != "gguf":
        raise QuantkitError(f"format {f.name} does not run in llama.cpp", hint="pick a GGUF type such as q4_k_m")
    if rt == "torch" and f.family == "gguf":
        raise QuantkitError(f"format {f.name} is a GGUF type; the torch runtime takes fp16, bf16, int8, nf4, gptq-*")
    ts = tensors if tensors is not None else formats.tensor_bytes(m, f)
    kv = kv_cache(m, n_ctx, batch, kv_type, rt, swa_full)
    per_layer = [0] * m.n_layer
    non_layer = 0
    head = 0
    for t in ts:
        i = t.layer
        if i is not None and i < m.n_layer:
            per_layer[i] += t.nbytes
        else:
            non_layer += t.nbytes
        if t.name == "output.weight" or (m.tied_embeddings and t.name == "token_embd.weight"):
            head = t.nbytes
    for i, b in enumerate(kv.per_layer):
        per_layer[i] += b
    weights = sum(t.nbytes for t in ts)
    if rt == "llama.cpp":
        compute = llamacpp_compute(m, n_ctx, batch, flash_attn)
        out = llamacpp_output_buffer(m, batch)
    else:
        compute = torch_compute(m, n_ctx, batch)
        out = 0
    vision = m.vision.mmproj_bytes + m.vision.compute_bytes if m.vision is not None else 0
    return Inference(f.name, rt, weights, kv.total, compute, out, overhead(rt, False), per_layer,
                     non_layer, head, kv, cpu_repack_bytes(ts) if rt == "llama.cpp" else 0, vision)


# ---------------------------------------------------------------- training

def _linear_shapes(ts: list[Tensor]) -> list[tuple[str, int, int, int]]:
    """(canonical name, n matrices, out, in) of the block linears (not embeddings/head)."""
    out = []
    for t in ts:
        n = formats.canonical(t.name)
        if formats.gpu_linear(t):
            *lead, o, i = t.shape
            out.append((n, math.prod(lead) if lead else 1, o, i))
    return out


LORA_TARGETS = {"q": "attn_q.", "k": "attn_k.", "v": "attn_v.", "o": "attn_output.", "qkv": "attn_qkv.",
                "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


def activations_per_token_layer(m: ModelShape) -> int:
    """Bytes autograd saves per token per layer, 16-bit [act]."""
    h, hq, hkv, f = m.n_embd, m.n_head * m.head_dim, m.n_head_kv * m.head_dim, m.n_ff
    ff = 4 * f if m.ffn != "plain" else 2 * f
    if m.n_expert:
        ff = ff * m.n_expert_used
    return 2 * (4 * h + 2 * hq + 2 * hkv + ff)


@dataclass
class Training:
    mode: str
    weights: int
    gradients: int
    optimizer: int
    trainable_params: int
    activations: int
    activations_checkpointed: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    @property
    def total_checkpointed(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations_checkpointed
                + self.logits + self.overhead)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        d["total_checkpointed"] = self.total_checkpointed
        return d


def training(m: ModelShape, mode: str, seq_len: int, batch: int = 1, rank: int = 16,
             targets: str = "q,k,v,o,gate,up,down") -> Training:
    """GPU memory to fine-tune: full (mixed-precision Adam) [zero], LoRA [lora], QLoRA [qlora]."""
    check_range("--ctx", seq_len, 1, 16 * 1024 * 1024)
    check_range("--batch", batch, 1, 65536)
    if mode not in ("full", "lora", "qlora"):
        raise QuantkitError(f"unknown training mode '{mode}'", hint="full, lora or qlora")
    ts = formats.unquantized_shapes(m)
    P = sum(t.n_elements for t in ts)
    tokens = seq_len * batch
    per_tok_layer = activations_per_token_layer(m)
    act = tokens * per_tok_layer * m.n_layer
    act_ckpt = tokens * 2 * m.n_embd * m.n_layer + tokens * per_tok_layer
    logits = tokens * m.n_vocab * (4 + 4)          # fp32 logits and their gradient
    if mode == "full":
        return Training(mode, 2 * P, 2 * P, 12 * P, P, act, act_ckpt, logits, CUDA_CONTEXT)
    check_range("--rank", rank, 1, 65536)
    keys = [k.strip() for k in targets.split(",") if k.strip()]
    bad = [k for k in keys if k not in LORA_TARGETS and k != "all"]
    if bad:
        raise QuantkitError(f"unknown LoRA target(s) {', '.join(bad)}", hint="choose from " + ", ".join(LORA_TARGETS))
    if "all" in keys:
        keys = list(LORA_TARGETS)
    lin = _linear_shapes(ts)
    phi = sum(n * rank * (o + i) for name, n, o, i in lin
              if any(LORA_TARGETS[k] in name for k in keys) and "_exps" not in name)
    if mode == "lora":
        base = 2 * P
    else:
        base = formats.total(formats.tensor_bytes(m, formats.parse_format("nf4"), ts))
    return Training(mode, base + 4 * phi, 4 * phi, 8 * phi, phi, act, act_ckpt, logits, CUDA_CONTEXT)


# ---------------------------------------------------------------- resident memory on a CPU

# ggml-cpu repacks these types into row-interleaved copies (CPU_REPACK buffer) on x86 with AVX2
# and on ARM; the mmap'd original pages stay resident too. token_embd is only read by
# GET_ROWS, which the repacked layout does not serve, so it is not copied.
CPU_REPACK_TYPES = {"q4_0", "q4_k", "iq4_nl"}
# The vocabulary llama.cpp holds (token strings, maps, piece cache), per token of the vocabulary.
# Measured with benchmarks/plan_vs_measured.py (vocab_only load); see BENCHMARKS.md.
# Gemma-3's 262144 tokens: 46.3 MB, 177 bytes per token.
VOCAB_BYTES_PER_TOKEN = 177
# One llama_token_data (id, logit, p: 12 bytes) per vocabulary token: the candidates array a
# sampler fills for every sampled token (llama_sampler_sample's std::vector; llama-server's
# common_sampler keeps its own). Freed and reallocated each token, it stays in glibc's heap.
SAMPLER_BYTES_PER_TOKEN = 12
# llama-cpp-python splits a prompt into n_batch = 512 token batches; llama-server into n_batch = 2048
# (common.h), each cut into n_ubatch = 512 token ubatches: the same 512-token ubatches either way.
SERVER_N_BATCH = 2048


@dataclass(frozen=True)
class LlamaProcess:
    """What a llama.cpp front end holds besides the model's buffers, and the context settings it
    passes by default. base: RSS of the process before a model is loaded plus the code pages a run
    touches, measured (benchmarks/plan_vs_measured.py --full-context, BENCHMARKS.md)."""
    name: str
    base: int
    flash_attn: bool          # the default: llama-cpp-python passes flash_attn=False; the server's
    #                           "auto" resolves to on when the CPU backend runs the op (always)
    n_seq: int                # sequences the KV cache and the output buffer are sized for
    checkpoints: bool         # llama-server saves sliding-window cache states (context checkpoints)


LLAMA_PROCESSES = {
    # the same workload on a near-weightless model (2-layer llama, 1k vocabulary) less the planner's
    # terms for it: 52.5 MB for Python + numpy + llama_cpp after a run (46.8 MB after the imports;
    # a run adds the code pages it touches, threads, the bindings' arrays), 20.1 MB for llama-server
    "llama-cpp-python": LlamaProcess("llama-cpp-python", 52_488_192, False, 1, False),
    "llama-server": LlamaProcess("llama-server", 20_097_024, True, 4, True),
}
LLAMA_PROCESSES["llama.cpp"] = LLAMA_PROCESSES["llama-cpp-python"]


def llama_process(runtime: str) -> LlamaProcess:
    try:
        return LLAMA_PROCESSES[runtime]
    except KeyError:
        raise QuantkitError(f"unknown llama.cpp runtime '{runtime}'",
                            hint="llama-cpp-python or llama-server") from None


def _ubatches(n_prompt: int) -> list[tuple[int, int]]:
    """(tokens, end position) of the last two ubatches of an n_prompt-token prompt: the graphs
    with the most KV cells to attend to."""
    out = []
    end = n_prompt
    while end > 0 and len(out) < 2:
        start = (end - 1) // N_UBATCH * N_UBATCH
        out.append((end - start, end))
        end = start
    return out


def llamacpp_compute_touched(m: ModelShape, n_prompt: int, flash_attn: bool = False,
                             cells_full: int | None = None, cells_swa: int | None = None) -> dict[str, int]:
    """Compute-buffer pages a prompt of n_prompt tokens touches, and the CPU backend's work buffer.

    ggml-alloc places each ubatch's graph in the compute buffer (reserved for the worst case, a
    full ubatch of outputs; only what a graph uses is touched), freeing a tensor after its last
    use and running softmax, rope, norms and element-wise ops in place. The largest live set is
    the attention step of a full-attention layer: the KQ masks (inputs, live through the graph: one
    per attention kind, [n_kv, n_tokens], f32, f16 with flash attention), the residual stream, Q,
    the scores KQ [n_kv, n_tokens, n_head] f32 and their product with V; or the FFN step: masks,
    residual and normed input, gate and up [n_ff, n_tokens]. The work buffer (ggml_cplan) holds
    the scores converted to f16 for the V product (f16 cache, no flash attention); freed and
    reallocated larger for each ubatch, the previous one stays in glibc's heap while it is below
    the 32 MiB mmap threshold [glibc]."""
    swa = any(m.swa_layers())
    full = cells_full if cells_full is not None else pad(n_prompt, KV_PAD)
    win = cells_swa if cells_swa is not None else full
    mask_b = 2 if flash_attn else 4
    touched, works = 0, []
    for n_tok, end in _ubatches(n_prompt):
        n_kv = min(full, pad(end, KV_PAD))
        n_kv_swa = min(win, pad(end, KV_PAD))
        masks = (n_kv + (n_kv_swa if swa else 0)) * n_tok * mask_b
        act = n_tok * m.n_embd * 4
        q = n_tok * m.n_head * m.head_dim * 4
        kq = 0 if flash_attn else n_kv * n_tok * m.n_head * 4
        attn = masks + act + 2 * q + kq
        ffn = masks + 2 * act + 2 * n_tok * m.n_ff * 4
        touched = max(touched, attn, ffn, m.n_vocab * 4 + act)
        works.append(0 if flash_attn else n_kv * n_tok * m.n_head * 2)
    work = works[0] + (min(works[1], GLIBC_MMAP_THRESHOLD_MAX) if len(works) > 1 and works[1] < GLIBC_MMAP_THRESHOLD_MAX
                       else 0)
    return {"compute_touched": touched, "work": work}


def cpu_repack_bytes(tensors: list[Tensor]) -> int:
    return sum(t.nbytes for t in tensors
               if t.type in CPU_REPACK_TYPES and len(t.shape) == 2 and t.shape[0] % 8 == 0
               and t.name != "token_embd.weight")


def torch_cpu_forward(m: ModelShape, n_ctx: int, n_keep: int | None = None) -> dict[str, int]:
    """Activations of one float32 forward pass of transformers on a CPU, batch 1, eager attention,
    no grad, over n_ctx tokens keeping the logits of the last n_keep positions (quantkit eval keeps
    the second half) [eager]. Bytes over the weights, by stage:
    - masks: one additive fp32 mask [n, n] per attention kind (full, sliding window), live through
      all layers;
    - attention step: masks + scores and their transform (2 x n_head x n^2 fp32) + the residual and
      hidden states, q, k, v, the rotary cos/sin of both layer kinds, the k, v copies repeat_kv makes
      for grouped-query attention, the attention output and its contiguous copy;
    - MLP step: masks + the attention weights the decoder layer keeps (n_head x n^2) + residual,
      hidden and gate, up, gelu(gate) [n, n_ff];
    - logits: n_keep x n_vocab fp32 + the final hidden states (the masks are freed by then).
    glibc [glibc] serves tensors below 32 MiB (its largest mmap threshold) from the heap, which
    grows to the largest set of them live at once and stays that size for the rest of the pass;
    tensors of 32 MiB and more are mmap'd and go back to the system when freed. So the peak is
    heap + the largest stage's mmap'd tensors."""
    n_keep = n_ctx - n_ctx // 2 if n_keep is None else n_keep
    n, f4 = n_ctx, 4
    hid = n * m.n_embd * f4
    q, kv, ff = n * m.n_head * m.head_dim * f4, n * m.n_head_kv * m.head_dim * f4, n * m.n_ff * f4
    n_kinds = 2 if any(m.swa_layers()) else 1
    mask = n * n * f4
    scores = m.n_head * n * n * f4
    rope = 2 * n_kinds * n * m.head_dim * f4
    rep = [q, q] if m.n_head_kv < m.n_head else []
    attn = [mask] * n_kinds + [scores, scores, hid, hid, q, kv, kv, rope, q, q] + rep
    mlp = [mask] * n_kinds + [scores, hid, hid, ff, ff, ff]
    logits = n_keep * m.n_vocab * f4 + hid
    small = lambda ts: sum(t for t in ts if t < GLIBC_MMAP_THRESHOLD_MAX)  # noqa: E731
    heap = max(small(attn), small(mlp))
    mapped = max(sum(attn) - small(attn), sum(mlp) - small(mlp), logits)
    return {"masks": n_kinds * mask, "attention": sum(attn), "mlp": sum(mlp), "logits": logits,
            "heap": heap, "peak": heap + mapped}


def torch_cpu_parts(m: ModelShape, tensors: list[Tensor], n_ctx: int, from_gguf: bool) -> dict[str, int]:
    """Peak RSS of quantkit's torch runtime (transformers, float32, CPU) scoring one n_ctx chunk,
    term by term (bytes). Two phases; the peak is the larger:
    - load (a GGUF through quantkit.runtimes.torch.model_from_gguf), at the end of
      load_state_dict: process base + the open reader's header objects (per vocabulary token)
      + the file's pages (memory-mapped, all read) + the dequantized float32 state dict (F32 tensors
      of the file are views of the map; Gemma's norms are shifted copies, a few KB) + the model's
      float32 parameters + the free heap glibc keeps (M_TRIM_THRESHOLD, 64 MiB) [glibc];
    - forward: process base + parameters + the free heap glibc keeps after loading (64 MiB) + the
      forward's activations: the heap its sub-32-MiB tensors grow and the mmap'd tensors of its
      largest stage (torch_cpu_forward) [eager].
    A model loaded from an HF directory (from_pretrained) is planned as base + parameters for the
    load phase: not measured."""
    w = sum(t.n_elements for t in tensors) * 4
    fwd = torch_cpu_forward(m, n_ctx)
    forward = TORCH_CPU_BASE + w + GLIBC_TRIM_THRESHOLD + fwd["peak"]
    if from_gguf:
        state = sum(t.n_elements * 4 for t in m.tensors if t.type != "f32")
        load = (TORCH_CPU_BASE + m.n_vocab * GGUF_READER_BYTES_PER_TOKEN + m.stored_bytes + state + w
                + GLIBC_TRIM_THRESHOLD)
    else:
        load = TORCH_CPU_BASE + w
    return {"base": TORCH_CPU_BASE, "weights": w, "load": load, "forward": forward,
            "forward_stage": fwd["peak"], "peak": max(load, forward)}


def torch_cpu_resident(m: ModelShape, tensors: list[Tensor], n_ctx: int, from_gguf: bool) -> int:
    """Peak RSS of quantkit's torch runtime on a CPU (see torch_cpu_parts)."""
    return torch_cpu_parts(m, tensors, n_ctx, from_gguf)["peak"]


def process_kv(m: ModelShape, inf: "Inference", proc: LlamaProcess) -> KVCache:
    """The KV cache as the front end sizes it: llama-server's n_seq slots share one unified cache of
    n_ctx cells, and its sliding-window layers keep n_swa x n_seq + n_ubatch cells [kv-swa]."""
    kv = inf.kv_detail
    if proc.n_seq == 1 or kv.cells_swa >= kv.cells_full:
        return kv
    cells_swa = min(kv.cells_full, pad(m.sliding_window * proc.n_seq + min(N_UBATCH, kv.cells_full), KV_PAD))
    per_layer = [kv.bytes_per_cell_layer * (cells_swa if s else kv.cells_full) for s in m.swa_layers()]
    return KVCache(kv.kv_type, kv.cells_full, cells_swa, kv.n_full_layers, kv.n_swa_layers,
                   kv.bytes_per_cell_layer, per_layer, sum(per_layer), kv.swa_full)


def cpu_resident_parts(m: ModelShape, inf: "Inference", n_prompt: int,
                       runtime: str = "llama-cpp-python") -> dict[str, int]:
    """Peak RSS of a llama.cpp CPU process (llama-cpp-python or llama-server) that evaluates
    n_prompt tokens and samples from the last, term by term (bytes): the process itself, mmap'd
    weights (all touched), repacked copies, the KV cache (cleared at start, so resident), the
    output buffer (logits of one token per sequence), the touched compute pages and the work
    buffer (llamacpp_compute_touched), the sampler's candidates, the vocabulary; llama-server
    adds its context checkpoints (tools/server/server-context.cpp): copies of the sequence's
    sliding-window cells, the window's worth, that it saves before the batch that reaches the last
    n_ubatch tokens of the prompt and again before the prompt's last few tokens (one checkpoint
    when the prompt fits one n_batch = 2048 token batch, as the first batch has nothing to save)."""
    proc = llama_process(runtime)
    kv = process_kv(m, inf, proc)
    comp = llamacpp_compute_touched(m, n_prompt, proc.flash_attn, kv.cells_full, kv.cells_swa)
    n_swa = sum(m.swa_layers())
    swa_state = 0
    if proc.checkpoints and n_swa and not kv.swa_full:
        n_ckpt = 2 if n_prompt > SERVER_N_BATCH else 1
        swa_state = n_ckpt * n_swa * kv.bytes_per_cell_layer * min(kv.cells_swa, m.sliding_window, n_prompt)
    return {"base": proc.base, "weights": inf.weights, "repack": inf.repack, "kv": kv.total,
            "output": m.n_vocab * 4 * proc.n_seq, **comp, "sampler": m.n_vocab * SAMPLER_BYTES_PER_TOKEN,
            "vocab": m.n_vocab * VOCAB_BYTES_PER_TOKEN,
            "checkpoint": swa_state,
            "vision": inf.vision}


def cpu_resident(m: ModelShape, inf: "Inference", n_prompt: int, runtime: str = "llama-cpp-python") -> int:
    """Peak RSS of a llama.cpp CPU process that evaluates n_prompt tokens (cpu_resident_parts)."""
    return sum(cpu_resident_parts(m, inf, n_prompt, runtime).values())
