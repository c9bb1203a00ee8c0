"""Formats x devices: does it fit, how many layers go to the GPU, how fast.

The public entry is `plan(model, options)`; it returns a `Plan` that the CLI renders as a
table (or JSON) with the assumptions and footnotes under it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..util.errors import QuantkitError
from . import formats, hardware, memory, speed
from .hardware import Device
from .model import ModelShape, load

GGUF_DEFAULT_FORMATS = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k"]
TORCH_DEFAULT_FORMATS = ["bf16", "int8", "gptq-8bit-128g", "gptq-4bit-128g", "gptq-3bit-128g", "nf4"]
HOST_RAM_DEFAULT = "ddr4-3200-2ch"     # where offloaded layers live when a GPU is too small


@dataclass
class PlanOptions:
    devices: list[str] = field(default_factory=list)
    vram_gb: float | None = None
    bandwidth_gbs: float | None = None
    tflops: float | None = None
    n_ctx: int | None = None            # default: min(4096, n_ctx_train)
    batch: int = 1
    kv_type: str = "f16"
    runtime: str = "llama.cpp"          # or a llama.cpp front end: llama-cpp-python, llama-server
    formats: list[str] | None = None
    swa_full: bool = False
    flash_attn: bool = False
    ram_gb: float | None = None         # host RAM for offloaded layers / CPU rows
    train: str | None = None
    rank: int = 16
    lora_targets: str = "q,k,v,o,gate,up,down"
    images: int = 1                     # vision-language model: images in the context, each adds its tokens
    process: str = "llama-cpp-python"   # the llama.cpp front end whose resident memory is planned

    def validate(self) -> None:
        if self.runtime in ("llama-cpp-python", "llama-server"):
            # a front end of llama.cpp: its defaults (llama-server: flash attention on, 4 slots)
            self.process, self.runtime = self.runtime, "llama.cpp"
            self.flash_attn = self.flash_attn or memory.llama_process(self.process).flash_attn
        if self.runtime not in ("llama.cpp", "torch"):
            raise QuantkitError(f"unknown runtime '{self.runtime}'",
                                hint="llama.cpp, llama-cpp-python, llama-server or torch")
        if self.kv_type not in ("f16", "q8_0", "q4_0", "bf16", "f32"):
            raise QuantkitError(f"unknown --kv-type '{self.kv_type}'", hint="f16, q8_0 or q4_0")
        if self.ram_gb is not None and not (0 < self.ram_gb < 100_000):
            raise QuantkitError(f"--ram {self.ram_gb:g} is not a plausible value", hint="GiB, between 0 and 100000")
        if self.train and self.train not in ("full", "lora", "qlora"):
            raise QuantkitError(f"unknown --train '{self.train}'", hint="full, lora or qlora")


@dataclass
class Cell:
    device: str
    status: str                     # "fits" | "partial" | "no"
    layers_on_gpu: int | None
    n_layers: int
    memory_needed: int              # on the device (GPU: VRAM; CPU: RAM)
    memory_available: int
    decode_upper: float | None
    decode_expected: float | None
    prompt_expected: float | None

    def text(self) -> str:
        gib = self.memory_needed / memory.GIB
        if self.status == "no":
            return f"no ({gib:.1f} GiB)"
        spd = f"{self.decode_expected:.1f} t/s" if self.decode_expected else "speed n/a (type not calibrated)"
        if self.status == "partial":
            return f"{self.layers_on_gpu}/{self.n_layers} layers, {spd}"
        return f"yes {gib:.1f} GiB, {spd}"


@dataclass
class FormatRow:
    format: str
    description: str
    memory: memory.Inference
    bytes_per_token: float
    flops_per_token: float
    cells: list[Cell]
    cpu_resident: int | None = None     # llama.cpp on a CPU: expected peak RSS (prompt fills the context)


@dataclass
class Plan:
    model: ModelShape
    options: PlanOptions
    n_ctx: int
    devices: list[Device]
    rows: list[FormatRow]
    training: memory.Training | None
    assumptions: list[str]
    footnotes: dict[str, str]

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "options": asdict(self.options) | {"n_ctx": self.n_ctx},
            "devices": [d.to_dict() for d in self.devices],
            "formats": [{
                "format": r.format, "description": r.description, "memory": r.memory.to_dict(),
                "weight_and_kv_bytes_read_per_token": r.bytes_per_token, "flops_per_token": r.flops_per_token,
                "cpu_resident_bytes": r.cpu_resident,
                "devices": [asdict(c) for c in r.cells]} for r in self.rows],
            "training": self.training.to_dict() if self.training else None,
            "assumptions": self.assumptions,
            "footnotes": self.footnotes,
        }


def _devices(o: PlanOptions) -> list[Device]:
    out = [hardware.device(d) for d in o.devices]
    if o.vram_gb is not None or o.bandwidth_gbs is not None:
        out.append(hardware.custom(o.vram_gb, o.bandwidth_gbs, o.tflops))
    if not out:
        out = [hardware.device(d) for d in hardware.DEFAULT_DEVICES]
    return out


def _fit(m: ModelShape, inf: memory.Inference, d: Device, host: Device, ram: int, bpt_weights: float,
         bpt_kv: float, flops: float, eff: hardware.Efficiency, calibrated_tps: float | None = None) -> Cell:
    n = m.n_layer
    prompt_eff = eff.prompt
    if not d.is_gpu:
        need = inf.total
        avail = ram if d.kind == "cpu" and ram else d.total_memory
        if need > avail:
            return Cell(d.name, "no", None, n, need, avail, None, None, None)
        up = speed.decode_upper_bound(d.bandwidth, bpt_weights + bpt_kv)
        pr = speed.prompt_tokens_per_s(d.tflops, flops, prompt_eff)
        if d.name == hardware.CALIBRATED_CPU:
            return Cell(d.name, "fits", None, n, need, avail, up, calibrated_tps, pr)
        return Cell(d.name, "fits", None, n, need, avail, up, up * eff.decode(d.kind), pr)
    # discrete GPU(s): repeating layers + output head on the GPU, token embedding stays in RAM
    # (llama.cpp keeps token_embd on the CPU; -ngl counts the output as one more layer)
    gpu_fixed = d.count * memory.CUDA_CONTEXT + inf.compute + inf.vision
    avail = d.total_memory
    layer_bytes = inf.per_layer
    head = inf.output_head if inf.runtime == "llama.cpp" else inf.non_layer
    full_need = gpu_fixed + sum(layer_bytes) + head
    if full_need <= avail:
        up = speed.decode_upper_bound(d.bandwidth, bpt_weights + bpt_kv)
        pr = speed.prompt_tokens_per_s(d.tflops, flops, prompt_eff)
        return Cell(d.name, "fits", n, n, full_need, avail, up, up * eff.decode("gpu"), pr)
    # partial offload: the last k layers on the GPU (llama.cpp offloads from the end)
    room = avail - gpu_fixed
    k, used = 0, 0
    for b in reversed(layer_bytes):
        if used + b > room:
            break
        used += b
        k += 1
    cpu_need = inf.total - used
    if k == 0 or cpu_need > ram or inf.runtime == "torch":
        return Cell(d.name, "no", k if inf.runtime == "llama.cpp" else None, n, full_need, avail,
                    None, None, None)
    # the bytes a token reads split like the resident bytes (layers are alike)
    total_read = bpt_weights + bpt_kv
    gpu_read = total_read * used / max(1, inf.weights + inf.kv)
    cpu_read = total_read - gpu_read
    up = speed.split_decode([(gpu_read, d.bandwidth), (cpu_read, host.bandwidth)])
    exp = speed.split_decode([(gpu_read, d.bandwidth * eff.decode("gpu")),
                              (cpu_read, host.bandwidth * eff.decode("cpu"))])
    return Cell(d.name, "partial", k, n, gpu_fixed + used, avail, up, exp, None)


def _format_names(m: ModelShape, o: PlanOptions) -> list[str]:
    """The formats to plan: the options' or the runtime's defaults, the file's own format first."""
    fmts = o.formats or (GGUF_DEFAULT_FORMATS if o.runtime == "llama.cpp" else TORCH_DEFAULT_FORMATS)
    if m.stored_format and m.stored_format not in fmts:
        try:
            f = formats.parse_format(m.stored_format)
            if f.runtime == o.runtime:
                fmts = [m.stored_format] + list(fmts)
        except QuantkitError:
            pass
    return fmts


def _row(m: ModelShape, o: PlanOptions, f: formats.Format, n_ctx: int, src: list, devs: list[Device],
         host: Device, ram: int | None, eff: hardware.Efficiency) -> FormatRow:
    """One format: its memory, the bytes and FLOPs per token, and a cell per device."""
    # the file's own format: its header bytes, exactly
    ts = m.tensors if (m.stored_format == f.name and all(t.nbytes for t in m.tensors)) else formats.tensor_bytes(m, f, src)
    inf = memory.inference(m, f, n_ctx, o.batch, o.kv_type, o.runtime, o.swa_full, o.flash_attn, tensors=ts)
    bpt_w = speed.weight_bytes_per_token(m, ts)
    half = max(1, n_ctx // 2)
    bpt_kv = speed.kv_bytes_per_token(inf.kv_detail.bytes_per_cell_layer, half, m.swa_layers(),
                                      m.sliding_window, o.batch) / o.batch
    flops = speed.flops_per_token(m, ts, half)
    cal = None
    cm = speed.cpu_model()
    if (cm and o.runtime == "llama.cpp" and o.batch == 1 and any(d.name == hardware.CALIBRATED_CPU for d in devs)
            and cm.covers(m, ts)):
        cal = 1.0 / cm.seconds(m, ts, half, o.kv_type)
    cells = []
    for d in devs:
        r = ram if ram else (host.total_memory if d.is_gpu else d.total_memory)
        cells.append(_fit(m, inf, d, host, r, bpt_w, bpt_kv, flops, eff, cal))
    if o.runtime == "llama.cpp":
        rss = memory.cpu_resident(m, inf, n_ctx * o.batch, o.process)
    elif f.name == "fp32" and o.batch == 1:
        # quantkit's torch runtime on a CPU runs float32: loading, then scoring one n_ctx chunk
        from_gguf = m.source.startswith("GGUF header")
        rss = memory.torch_cpu_resident(m, ts, n_ctx, from_gguf)
    else:
        rss = None
    return FormatRow(f.name, formats.describe(f), inf, bpt_w + bpt_kv, flops, cells, rss)


def _assumptions(m: ModelShape, o: PlanOptions, n_ctx: int, devs: list[Device], host: Device,
                 eff: hardware.Efficiency, rows: list[FormatRow]) -> tuple[list[str], list[str]]:
    """The assumptions printed under the table, and the footnote keys they cite."""
    swa = m.swa_layers()
    calibrated = any(d.name == hardware.CALIBRATED_CPU for d in devs)
    assumptions = [
        f"context {n_ctx} tokens x batch {o.batch}, KV cache {o.kv_type}, runtime {o.runtime}"
        + (f" ({o.process})" if o.runtime == "llama.cpp" else "")
        + (", flash attention" if o.flash_attn else ", no flash attention"),
        f"KV cache: {sum(1 for s in swa if not s)} full-attention layers, {sum(swa)} sliding-window layers"
        + (f" (window {m.sliding_window}, {'full-size cache' if o.swa_full else 'window-sized cache'}) [kv-swa]" if any(swa) else ""),
        "GPU: weights of all layers and the output head in VRAM plus compute buffer and a "
        f"{memory.CUDA_CONTEXT // memory.MIB} MiB CUDA context per GPU; token embedding stays in RAM; "
        "multi-GPU splits layers in proportion to VRAM",
        f"partial offload: the last N layers on the GPU, the rest read from {host.label} "
        f"({host.bandwidth / 1e9:.1f} GB/s); RAM {'%.0f GiB' % o.ram_gb if o.ram_gb else 'as in the device row / %d GiB host' % (host.total_memory // memory.GIB)}",
        "Apple: usable memory is Metal's working-set limit (fraction of RAM in hardware.yaml)",
        f"speed at a half-full context ({max(1, n_ctx // 2)} tokens); expected = bound x efficiency "
        f"(CPU {eff.decode_cpu}, GPU {eff.decode_gpu}, Apple {eff.decode_apple}; prompt {eff.prompt}) [speed]",
        "'total' is what llama.cpp allocates (fit decisions use it); 'RSS' is the expected peak resident memory "
        f"on a CPU of {o.process if o.runtime == 'llama.cpp' else 'quantkit eval'} with the prompt filling the context: "
        "mmap'd weights, repacked copies, KV, touched compute pages and work buffer, sampler, vocabulary, process"
        + (" and its context checkpoints" if o.process == "llama-server" else ""),
        "compute buffer is an estimate [compute]; weights are exact from "
        + ("the file header" if m.stored_format else "the config") + " [mix] [gptq]",
    ]
    if o.runtime == "llama.cpp" and o.process == "llama-cpp-python" and any(swa) and not o.swa_full:
        assumptions.append("llama-cpp-python: planned with Llama(..., swa_full=False); left unset it passes the C "
                           "API's default, swa_full=true (a full-size cache for sliding-window layers): plan that "
                           "with --swa-full")
    if any(r.format in formats.IQ_FTYPES for r in rows):
        assumptions.append(formats.IQ_NOTE)
    if calibrated:
        cm = speed.cpu_model()
        assumptions.append(
            f"{hardware.CALIBRATED_CPU}: decode s/token = {cm.o_token * 1e3:.2f} ms + {cm.o_layer * 1e6:.0f} us x layers "
            f"+ bytes read / {cm.bandwidth / 1e9:.1f} GB/s + per-weight cost of each tensor type (plan/cpu_speed.yaml, "
            f"{cm.threads} thread; batch 1 only) [cpu-speed]")
    notes = ["kv-swa", "compute", "mix", "gptq", "speed"] + (["cpu-speed"] if calibrated else [])
    if o.kv_type not in ("f16", "bf16", "f32"):
        notes.append("kv-q")
    if any(r.cpu_resident is not None for r in rows) and o.runtime == "torch":
        assumptions.append(
            f"torch RSS (fp32 on a CPU, as quantkit eval runs it): process base {memory.TORCH_CPU_BASE // memory.MIB} MiB "
            "+ the larger of loading (reader header, file pages, dequantized state dict, parameters, glibc heap) and "
            "parameters + glibc heap + the forward's heap of sub-32-MiB tensors + its largest stage (eager attention "
            "scores and masks, MLP, kept logits) "
            "[eager] [glibc]")
        notes += ["eager", "glibc"]
    if o.train:
        notes += ["zero", "act"] + (["lora"] if o.train != "full" else []) + (["qlora"] if o.train == "qlora" else [])
    return assumptions, notes


def plan(model: str | ModelShape, o: PlanOptions | None = None) -> Plan:
    o = o or PlanOptions()
    o.validate()
    m = load(model) if isinstance(model, str) else model
    if m.n_layer <= 0 or m.n_head <= 0 or m.head_dim <= 0:
        raise QuantkitError(f"model {m.name}: layer/head counts must be positive")
    n_ctx = o.n_ctx if o.n_ctx is not None else (min(4096, m.n_ctx_train) if m.n_ctx_train else 4096)
    memory.check_range("--ctx", n_ctx, 1, 16 * 1024 * 1024)
    if m.vision is not None:            # the context holds the text and the images' embeddings
        memory.check_range("--images", o.images, 0, 4096)
        n_ctx += o.images * m.vision.image_tokens
    memory.check_range("--batch", o.batch, 1, 65536)
    devs = _devices(o)
    host = hardware.device(HOST_RAM_DEFAULT)
    ram = int(o.ram_gb * memory.GIB) if o.ram_gb else None
    eff = hardware.efficiency()
    rows = []
    src = formats.unquantized_shapes(m)
    for fs in _format_names(m, o):
        f = formats.parse_format(fs)
        if f.runtime != o.runtime:
            raise QuantkitError(f"format {f.name} runs in {f.runtime}, not {o.runtime}",
                                hint=f"add --runtime {f.runtime} or pick another --format")
        rows.append(_row(m, o, f, n_ctx, src, devs, host, ram, eff))
    tr = memory.training(m, o.train, n_ctx, o.batch, o.rank, o.lora_targets) if o.train else None
    assumptions, notes = _assumptions(m, o, n_ctx, devs, host, eff, rows)
    if m.vision is not None:
        v = m.vision
        assumptions.append(
            f"vision: a {v.kind} tower + {v.projector} projector ({v.n_params / 1e6:.1f} M parameters) as an F16 "
            f"mmproj file of {v.mmproj_bytes / memory.MIB:.1f} MiB plus ~{v.compute_bytes / memory.MIB:.1f} MiB to "
            f"encode an image, in every total; the context counts {o.images} image(s) x {v.image_tokens} tokens")
    return Plan(m, o, n_ctx, devs, rows, tr, assumptions, {k: memory.FOOTNOTES[k] for k in notes})
