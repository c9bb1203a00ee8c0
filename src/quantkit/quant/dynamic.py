"""Dynamic INT8 quantization of linear, embedding and LSTM layers for CPU inference.

Weights are stored as int8 with one float32 scale per output channel (per row for embedding
tables); activations are quantized per batch at run time, inside the kernel
(quant/int8_kernels.py). `quantize_dynamic_(model, DynamicInt8Config())` swaps the modules in
place, torchao style; the int8 modules keep their integer weights as buffers, so a state dict
is plain tensors that safetensors can hold (no pickle), and `prepare_dynamic_(model, names)`
rebuilds the empty structure before loading one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..models.encoder import Encoder, load_encoder, save_encoder
from ..util.finite import check_finite
from . import int8_kernels as K

METHOD = "dynamic-int8"
POST_OPS = ("none", "gelu")


@dataclass
class DynamicInt8Config:
    quantize_embeddings: bool = False
    kernel: str = "auto"                  # "auto" | "fbgemm" | "reference"
    # activation grid: "row" (per token, default) or "tensor" (one per batch, torch.ao style)
    activation_granularity: str = "row"
    # module-name prefixes kept in float (e.g. a classification head)
    skip: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Int8DynamicLinear(nn.Module):
    """nn.Linear with int8 per-output-channel weights and per-batch int8 activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str = "auto",
                 per_row: bool = True, post_op: str = "none"):
        super().__init__()
        if post_op not in POST_OPS:
            raise ValueError(f"unknown post_op {post_op!r}; choose {', '.join(POST_OPS)}")
        self.in_features, self.out_features = in_features, out_features
        self.kernel = kernel
        self.per_row = per_row
        self.post_op = post_op      # "gelu": GELU(erf) applied to the output (fused by oneDNN)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None
        self._packed = None

    @classmethod
    def from_float(cls, lin: nn.Linear, kernel: str = "auto", per_row: bool = True) -> "Int8DynamicLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, kernel, per_row)
        m.set_weight(lin.weight, lin.bias)
        return m

    def set_weight(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        q, s = K.quantize_weight_per_channel(w)
        self.weight_int8.copy_(q)
        self.weight_scale.copy_(s)
        if b is not None:
            self.bias.copy_(b.detach().float())
        self._packed = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = K.resolve_kernel(self.kernel)
        if kernel == "onednn":
            if self._packed is None:
                self._packed = K.pack_onednn(self.weight_int8)
            fused = self.post_op if not self.per_row else "none"
            y = K.linear_onednn(x, self._packed, self.weight_scale, self.bias, self.per_row, fused)
            if fused != self.post_op:
                y = nn.functional.gelu(y)
            return y.to(x.dtype)
        if kernel == "fbgemm":
            if self._packed is None:
                # per-tensor activations: the bias rides in the kernel's output stage
                fused = None if self.per_row else self.bias
                self._packed = K.pack_fbgemm(self.weight_int8, self.weight_scale, fused)
            y = K.linear_fbgemm(x, self._packed, self.bias if self.per_row else None, self.per_row)
        else:
            y = K.linear_reference(x, self.weight_int8, self.weight_scale, self.bias, self.per_row)
        if self.post_op == "gelu":
            y = nn.functional.gelu(y)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8, "
                f"activations per {'row' if self.per_row else 'tensor'}"
                + ("" if self.post_op == "none" else f", then {self.post_op}"))


class Int8Embedding(nn.Module):
    """nn.Embedding with int8 rows and one float32 scale per row; rows dequantized on lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32))

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> "Int8Embedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
        q, s = K.quantize_rows_symmetric(emb.weight)
        m.weight_int8.copy_(q)
        m.weight_scale.copy_(s)
        return m

    @property
    def weight(self) -> torch.Tensor:      # some callers read .weight (e.g. dtype/device probes)
        return K.dequantize_weight(self.weight_int8, self.weight_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[ids].float() * self.weight_scale[ids].unsqueeze(-1)


class Int8LSTM(nn.Module):
    """Inference-only int8 replacement for a unidirectional nn.LSTM (any number of layers).

    Per layer, the input projection of all time steps is one int8 matmul (bias fused); the
    recurrent projection is one int8 matmul per step, h re-quantized each step; gate
    non-linearities and the cell state stay float32. h = o * tanh(c) lies in (-1, 1) for every
    row, so the recurrent projection always uses one activation grid per batch ("tensor"): the
    per-row grid buys no accuracy there and its four extra passes per step are what a batch-1
    step costs most. `per_row` applies to the input projection only.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 batch_first: bool = False, kernel: str = "auto", per_row: bool = True):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first = batch_first
        self.ih = nn.ModuleList()
        self.hh = nn.ModuleList()
        for layer in range(num_layers):
            n_in = input_size if layer == 0 else hidden_size
            self.ih.append(Int8DynamicLinear(n_in, 4 * hidden_size, True, kernel, per_row))
            self.hh.append(Int8DynamicLinear(hidden_size, 4 * hidden_size, False, kernel, per_row=False))

    @classmethod
    def from_float(cls, lstm: nn.LSTM, kernel: str = "auto", per_row: bool = True) -> "Int8LSTM":
        if lstm.bidirectional or lstm.proj_size:
            raise ValueError("Int8LSTM supports unidirectional LSTMs without projections")
        m = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.batch_first, kernel, per_row)
        for layer in range(lstm.num_layers):
            w_ih = getattr(lstm, f"weight_ih_l{layer}")
            w_hh = getattr(lstm, f"weight_hh_l{layer}")
            b = None
            if lstm.bias:
                b = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
            else:
                b = torch.zeros(4 * lstm.hidden_size)
            m.ih[layer].set_weight(w_ih, b)
            m.hh[layer].set_weight(w_hh, None)
        return m

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        if self.batch_first:
            x = x.transpose(0, 1)
        T, B, _ = x.shape
        H = self.hidden_size
        if hx is None:
            h0 = x.new_zeros(self.num_layers, B, H)
            c0 = x.new_zeros(self.num_layers, B, H)
        else:
            h0, c0 = hx
        hs, cs = [], []
        out = x
        for layer in range(self.num_layers):
            gates_x = self.ih[layer](out)                       # [T, B, 4H] in one matmul
            h, c = h0[layer], c0[layer]
            steps = []
            for t in range(T):
                g = gates_x[t] + self.hh[layer](h)
                i, f, gg, o = g.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                h = torch.sigmoid(o) * torch.tanh(c)
                steps.append(h)
            out = torch.stack(steps)
            hs.append(h)
            cs.append(c)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, (torch.stack(hs), torch.stack(cs))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


@torch.no_grad()
def quantize_dynamic_(model: nn.Module, config: DynamicInt8Config | None = None) -> dict[str, str]:
    """Swap nn.Linear / nn.LSTM (and nn.Embedding if asked) for int8 modules, in place.

    Returns {module name: kind} of what was quantized, the record a saved model needs to
    rebuild its structure (`prepare_dynamic_`).
    """
    config = config or DynamicInt8Config()
    K.resolve_kernel(config.kernel)
    if config.activation_granularity not in ("row", "tensor"):
        raise ValueError(f"activation_granularity must be 'row' or 'tensor', not {config.activation_granularity!r}")
    per_row = config.activation_granularity == "row"
    done: dict[str, str] = {}
    for name, mod in list(model.named_modules()):
        if not name or _skipped(name, config.skip):
            continue
        if isinstance(mod, nn.Linear):
            _set_module(model, name, Int8DynamicLinear.from_float(mod, config.kernel, per_row))
            done[name] = "linear"
        elif isinstance(mod, nn.LSTM):
            _set_module(model, name, Int8LSTM.from_float(mod, config.kernel, per_row))
            done[name] = "lstm"
        elif isinstance(mod, nn.Embedding) and config.quantize_embeddings:
            _set_module(model, name, Int8Embedding.from_float(mod))
            done[name] = "embedding"
    return done


def prepare_dynamic_(model: nn.Module, modules: dict[str, str], kernel: str = "auto",
                     per_row: bool = True) -> None:
    """Give a freshly built float model the int8 structure recorded by quantize_dynamic_."""
    for name, kind in modules.items():
        mod = model.get_submodule(name)
        if kind == "linear":
            new = Int8DynamicLinear(mod.in_features, mod.out_features, mod.bias is not None, kernel, per_row)
        elif kind == "embedding":
            new = Int8Embedding(mod.num_embeddings, mod.embedding_dim, mod.padding_idx)
        elif kind == "lstm":
            new = Int8LSTM(mod.input_size, mod.hidden_size, mod.num_layers, mod.batch_first, kernel, per_row)
        else:
            raise ValueError(f"unknown quantized module kind {kind!r} for {name}")
        _set_module(model, name, new)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what a safetensors file of the model holds)."""
    seen, total = set(), 0
    for t in list(model.state_dict().values()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---- encoders -------------------------------------------------------------------------
def _prepare_encoder(enc: Encoder, quantization: dict) -> None:
    if quantization.get("method") != METHOD:
        raise ValueError(f"unknown quantization method {quantization.get('method')!r}")
    prepare_dynamic_(enc, quantization["modules"], quantization.get("kernel", "auto"),
                     quantization.get("activation_granularity", "row") == "row")


def open_encoder(path=None) -> Encoder:
    """Load an fp32 or dynamic-int8 encoder directory (None = the bundled MiniLM)."""
    return load_encoder(path, prepare=_prepare_encoder)


def quantize_encoder_(enc: Encoder, config: DynamicInt8Config | None = None) -> Encoder:
    """Int8 the encoder's linear layers (and embeddings if asked); the classification head,
    a few hundred weights that decide the label, stays float."""
    config = config or DynamicInt8Config()
    if enc.meta.quantization:
        raise ValueError("encoder is already quantized")
    for name, t in enc.state_dict().items():
        check_finite(t, name, enc.source_dir)
    skip = list(config.skip) + ["head"]
    cfg = DynamicInt8Config(config.quantize_embeddings, config.kernel, config.activation_granularity, skip)
    modules = quantize_dynamic_(enc, cfg)
    enc.meta.quantization = {"method": METHOD, **cfg.to_dict(), "modules": modules}
    return enc
