"""A Hugging Face model directory as a `ModelSource`.

Reads config.json, the weights (model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model*.bin) and the tokenizer, and presents them in
llama.cpp's terms: GGUF tensor names, GGUF metadata keys, and tensor values transformed the way
llama.cpp's convert_hf_to_gguf.py transforms them (q/k row permutation for llama-style rotary,
Gemma's 1 + w norms, ...; the per-architecture facts live in `arch.HF_ARCHS`).

Nothing is read eagerly but headers: safetensors tensors are read with pread, one per `load`
(never memory-mapped, so a model larger than RAM streams through in bounded memory), .bin
files with `torch.load(mmap=True, weights_only=True)`, and only when asked: a .bin file is a
pickle, so it is read only when trusted (models.pickles: the CLI's --trust-pickle, the API's
trust_pickle=True, or `HFSource(..., trust_pickle=True)`); otherwise it is refused with a
one-line error that says how to convert it to safetensors.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from gguf import GGUFValueType

from quantkit.models.arch import (
    HFArch,
    canonical_order,
    expert_index,
    find_hf_arch,
    hf_to_gguf_name,
    permute_for_rope,
    supported_hf_architectures,
)
from quantkit.models.fused_experts import Piece, expert_width, per_expert_view
from quantkit.models.hf_config import check_config
from quantkit.models.hf_shapes import check_shapes
from quantkit.models.hf_meta import first, gguf_metadata, longrope_factors, rope_parameters
from quantkit.models.pickles import require_trusted
from quantkit.models.safetensors_file import SafetensorsFile
from quantkit.models.source import ArchSpec, MetaValue, ModelSource, TensorInfo
from quantkit.models.tokenizer_convert import convert_tokenizer
from quantkit.util.errors import QuantkitError

_ST_DTYPES: dict[str, tuple[str, int]] = {
    "F32": ("f32", 4), "F16": ("f16", 2), "BF16": ("bf16", 2), "F64": ("f64", 8),
}
_TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
}


class _SafetensorsFile(SafetensorsFile):
    """A .safetensors file (models.safetensors_file: header checked, data read with pread)
    whose tensors come back as torch tensors."""

    _TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

    def _read(self, name: str, dt: str, shape: tuple[int, ...], offset: int, n: int) -> torch.Tensor:
        """n bytes from `offset` in the data section as a tensor of `shape`."""
        buf = self.read(name, offset, n)
        if not buf:
            return torch.empty(shape, dtype=self._TORCH[dt])
        return torch.frombuffer(buf, dtype=self._TORCH[dt]).reshape(shape)

    def get_tensor(self, name: str) -> torch.Tensor:
        dt, shape, begin, end = self.entries[name]
        return self._read(name, dt, shape, begin, end - begin)

    def get_rows(self, name: str, r0: int, r1: int, flat: bool = False) -> torch.Tensor:
        """Rows r0:r1 (along the first axis) of a tensor, reading only their bytes. flat: of the
        tensor seen as 2-D [all leading axes, last axis] (an expert's rows of a fused [E, rows, cols])."""
        dt, shape, begin, end = self.entries[name]
        if flat and len(shape) > 2:
            shape = (math.prod(shape[:-1]), shape[-1])
        if not shape or not 0 <= r0 <= r1 <= shape[0]:
            raise IndexError(f"rows {r0}:{r1} of {name} with shape {shape}")
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        return self._read(name, dt, (r1 - r0, *shape[1:]), begin + r0 * row_bytes, (r1 - r0) * row_bytes)


@dataclass
class _Entry:
    """Where a canonical tensor comes from and what happens to it on the way."""
    hf_name: str
    file: str | None            # None: generated (rope_freqs, Phi-3's LongRoPE factors)
    shape: tuple[int, ...]      # shape after transforms (row-major)
    stored_type: str
    permute_heads: int = 0      # >0: permute rows for rotary with this many heads
    add: float = 0.0            # Gemma norm shift
    keep_rows: int | None = None
    experts: dict[int, str] | None = None   # stacked expert tensor: expert index -> HF name


class HFSource(ModelSource):
    """A Hugging Face directory of a decoder-only model of one of `arch.HF_ARCHS`' architectures."""

    def __init__(self, path: str | os.PathLike, tokenizer: bool = True, trust_pickle: bool | None = None):
        """tokenizer=False: weights only (no GGUF vocabulary is converted; `tokenizer` is None and
        the metadata has no tokenizer keys): for readers that use the directory's own tokenizer.
        trust_pickle: read pytorch_model*.bin weights (None: as the enclosing trusting_pickle() says)."""
        self.path = os.fspath(path)
        self._trust_pickle = trust_pickle
        if not os.path.exists(self.path):
            raise QuantkitError("no such model directory", self.path, "check the path")
        if not os.path.isdir(self.path):
            raise QuantkitError("not a Hugging Face model directory", self.path,
                                "pass the directory holding config.json")
        cfg_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(cfg_path):
            raise QuantkitError("directory has no config.json", self.path,
                                "a Hugging Face model directory holds config.json and *.safetensors")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                self.config: dict[str, Any] = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise QuantkitError(f"cannot read config.json ({type(e).__name__}: {e})", cfg_path,
                                "the file is corrupt") from None
        if not isinstance(self.config, dict):
            raise QuantkitError("config.json is not a JSON object", cfg_path)
        check_config(self.config, cfg_path)

        # multimodal configs (gemma3 with a vision tower) keep the text model in text_config
        self.hparams: dict[str, Any] = dict(self.config)
        if isinstance(self.config.get("text_config"), dict):
            self.hparams.update(self.config["text_config"])

        archs = self.config.get("architectures") or []
        arch = find_hf_arch(archs, self.config.get("model_type"))
        if arch is None and isinstance(self.config.get("text_config"), dict):
            # a vision-language wrapper (LlavaForConditionalGeneration): the language model's own type
            tc = self.config["text_config"]
            tc_archs = tc.get("architectures") if isinstance(tc.get("architectures"), list) else None
            arch = find_hf_arch([a for a in tc_archs or [] if isinstance(a, str)],
                                tc.get("model_type") if isinstance(tc.get("model_type"), str) else None)
        if arch is None:
            what = ", ".join(archs) or f"model_type {self.config.get('model_type')!r}"
            raise QuantkitError(f"unsupported architecture {what}", cfg_path,
                                f"supported: {', '.join(supported_hf_architectures())}")
        self.hf_arch: HFArch = arch
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
            if key not in self.hparams and key in arch.defaults:
                self.hparams[key] = arch.defaults[key]
            if not isinstance(self.hparams.get(key), int) or self.hparams[key] <= 0:
                raise QuantkitError(f"config.json has no valid {key}", cfg_path,
                                    "the config does not describe a complete model")

        self._handles: dict[str, Any] = {}
        stored = self._index_weights()
        # experts stored fused (transformers' own layout) are listed as the per-expert checkpoint
        # they stand for: each listed name that is part of a stored tensor has its Piece
        view, self._pieces = per_expert_view(arch.key, {n: s for n, (_, s, _) in stored.items()}, self.hparams,
                                             self.path, payload=stored.get)
        self._raw_index: dict[str, tuple[str, tuple[int, ...], str]] = {
            n: (entry[0], shape, entry[2]) for n, (shape, entry) in view.items()}

        # llama.cpp needs one token per embedding row: pad the vocabulary to the rows
        vocab_rows = self._embedding_rows()
        if tokenizer:
            tok = convert_tokenizer(self.path, self.config, vocab_rows or self.hparams.get("vocab_size"),
                                    add_space_prefix=arch.spm_add_space_prefix,
                                    all_added_tokens=arch.spm_all_added_tokens)
            self.tokenizer, n_tokens = tok.tokenizer, tok.n_tokens
        else:
            tok, self.tokenizer, n_tokens = None, None, vocab_rows or int(self.hparams.get("vocab_size") or 0)
        self._entries = self._plan_tensors(n_tokens)
        self._order = canonical_order(list(self._entries), arch)
        self.spec = self._make_spec()
        self.metadata = self._make_metadata()
        if tok is not None:
            self.metadata.update(tok.metadata)
            if arch.add_bos is not None:
                self.metadata["tokenizer.ggml.add_bos_token"] = MetaValue(arch.add_bos, GGUFValueType.BOOL)

    # ------------------------------------------------------------------ weights

    def _weight_files(self) -> tuple[str, list[str]]:
        d = self.path
        st_index = os.path.join(d, "model.safetensors.index.json")
        bin_index = os.path.join(d, "pytorch_model.bin.index.json")
        for kind, index in (("safetensors", st_index), ("bin", bin_index)):
            if os.path.isfile(index):
                try:
                    with open(index, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise QuantkitError(f"cannot read the weight map ({e.__class__.__name__})", index,
                                        "the index file is corrupt") from None
                files = sorted(set(weight_map.values()))
                for fn in files:
                    if not os.path.isfile(os.path.join(d, fn)):
                        raise QuantkitError(f"shard {fn} listed in the index is missing", index,
                                            "download every shard")
                self._weight_map = weight_map
                return kind, [os.path.join(d, fn) for fn in files]
        self._weight_map = None
        st = sorted(glob.glob(os.path.join(d, "*.safetensors")))
        if st:
            return "safetensors", st
        bins = sorted(glob.glob(os.path.join(d, "pytorch_model*.bin")))
        if bins:
            return "bin", bins
        raise QuantkitError("no weights (*.safetensors or pytorch_model*.bin)", d,
                            "download the model's weight files into the directory")

    def _index_weights(self) -> dict[str, tuple[str, tuple[int, ...], str]]:
        kind, files = self._weight_files()
        index: dict[str, tuple[str, tuple[int, ...], str]] = {}
        if kind == "bin":
            require_trusted(self.path, self._trust_pickle, files)
        for fn in files:
            if kind == "safetensors":
                try:
                    h = _SafetensorsFile(fn)
                    for name, (dt, shape, _, _) in h.entries.items():
                        if dt not in _ST_DTYPES:
                            raise QuantkitError(f"tensor {name} has unsupported dtype {dt}", fn,
                                                "quantized checkpoints are not read here; use the float model")
                        index[name] = (fn, shape, _ST_DTYPES[dt][0])
                except QuantkitError:
                    raise
                except Exception as e:  # SafetensorError, OSError
                    msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
                    raise QuantkitError(f"corrupt or truncated safetensors file ({msg})", fn,
                                        "download the file again") from None
                self._handles[fn] = h
            else:
                try:
                    sd = torch.load(fn, map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:
                    msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
                    raise QuantkitError(f"cannot read PyTorch checkpoint ({msg})", fn,
                                        "the file is corrupt or truncated") from None
                if not isinstance(sd, dict):
                    raise QuantkitError("checkpoint does not hold a state dict", fn)
                for name, t in sd.items():
                    if not isinstance(t, torch.Tensor):
                        continue
                    if t.dtype not in _TORCH_DTYPES:
                        raise QuantkitError(f"tensor {name} has unsupported dtype {t.dtype}", fn)
                    index[name] = (fn, tuple(t.shape), _TORCH_DTYPES[t.dtype])
                self._handles[fn] = sd
        if self._weight_map:
            missing = sorted(set(self._weight_map) - set(index))
            if missing:
                raise QuantkitError(f"{len(missing)} tensors of the index are missing from the shards "
                                    f"(first: {missing[0]})", self.path, "a shard is incomplete")
        return index

    def _embedding_rows(self) -> int | None:
        for name, (_, shape, _) in self._raw_index.items():
            try:
                if hf_to_gguf_name(self.hf_arch, name) == "token_embd.weight":
                    return shape[0]
            except KeyError:
                continue
        return None

    def _plan_tensors(self, n_tokens: int) -> dict[str, _Entry]:
        arch, hp = self.hf_arch, self.hparams
        n_head = int(hp["num_attention_heads"])
        n_head_kv = int(hp.get("num_key_value_heads") or n_head)
        entries: dict[str, _Entry] = {}
        for hf_name, (fn, shape, stype) in self._raw_index.items():
            try:
                name = hf_to_gguf_name(arch, hf_name)
            except KeyError:
                raise QuantkitError(f"tensor {hf_name} has no llama.cpp counterpart for {arch.key}",
                                    fn, "the checkpoint does not match its config.json") from None
            if name is None:
                continue
            if (xid := expert_index(hf_name)) is not None:
                e = entries.setdefault(name, _Entry(hf_name, fn, shape, stype, experts={}))
                if e.experts is None or xid in e.experts or e.shape != shape:
                    raise QuantkitError(f"tensor {hf_name} does not fit the other experts of {name}", fn,
                                        "the checkpoint is damaged")
                e.experts[xid] = hf_name
                continue
            if name in entries:
                raise QuantkitError(f"tensor {name} appears twice (second: {hf_name})", fn)
            e = _Entry(hf_name, fn, shape, stype)
            if arch.permute_qk and (".attn_q." in name or ".attn_k." in name):
                e.permute_heads = n_head if ".attn_q." in name else n_head_kv
            if arch.norm_shift and hf_name.endswith("norm.weight"):
                e.add = arch.norm_shift
            if name == "token_embd.weight" and arch.trim_embedding_to_vocab and shape[0] > n_tokens:
                e.keep_rows = n_tokens
                e.shape = (n_tokens, *shape[1:])
            entries[name] = e
        for need in ("token_embd.weight", "output_norm.weight"):
            if need not in entries:
                raise QuantkitError(f"checkpoint has no {need} (HF model.embed_tokens / model.norm)",
                                    self.path, "the weights are incomplete")
        for i in range(int(hp["num_hidden_layers"])):
            if f"blk.{i}.attn_q.weight" not in entries and f"blk.{i}.attn_qkv.weight" not in entries:
                raise QuantkitError(f"checkpoint has no weights for layer {i}", self.path,
                                    "the weights are incomplete or num_hidden_layers is wrong")
        check_shapes(self.path, {n: (e.hf_name, self._raw_index[e.hf_name][1]) for n, e in entries.items()
                                 if e.experts is None}, hp, self._head_dim())
        self._stack_experts(entries)
        self._generated: dict[str, list[float]] = {}
        if (factors := self._llama3_rope_factors()) is not None:
            self._generated["rope_freqs.weight"] = factors
        self._generated.update(longrope_factors(hp, self.hf_arch, self._head_dim(), self.path))
        for name, values in self._generated.items():
            entries[name] = _Entry(f"<generated {name}>", None, (len(values),), "f32")
        return entries

    def _stack_experts(self, entries: dict[str, _Entry]) -> None:
        """Every MoE layer has its router and all n_expert experts of each matrix; the stacked
        tensors get their [n_expert, rows, cols] shape."""
        n_exp = int(first(self.hparams, ("num_local_experts", "num_experts"), 0) or 0)
        stacked = {n: e for n, e in entries.items() if e.experts is not None}
        if not n_exp:
            if stacked:
                raise QuantkitError(f"the checkpoint has expert tensors ({next(iter(stacked.values())).hf_name}) "
                                    "but config.json gives no num_experts", os.path.join(self.path, "config.json"))
            return
        layers = sorted({int(n.split(".")[1]) for n in stacked})
        for i in layers:
            if f"blk.{i}.ffn_gate_inp.weight" not in entries:
                raise QuantkitError(f"layer {i} has experts but no router (its mlp.gate / block_sparse_moe.gate "
                                    "weight is missing)", self.path, "the checkpoint is incomplete; download it again")
        for n, e in stacked.items():
            missing = sorted(set(range(n_exp)) - set(e.experts))
            if missing or len(e.experts) != n_exp:
                raise QuantkitError(f"{n}: expert {missing[0] if missing else max(e.experts)} of {n_exp} is "
                                    f"{'missing' if missing else 'beyond num_experts'} ({e.hf_name})", self.path,
                                    "the checkpoint does not match config.json's expert count")
            e.shape = (n_exp, *e.shape)
            hidden, ff = int(self.hparams["hidden_size"]), expert_width(self.hparams)
            want = (ff, hidden) if n.split(".")[2] in ("ffn_gate_exps", "ffn_up_exps") else (hidden, ff)
            if e.shape[1:] != want:
                raise QuantkitError(f"tensor {e.hf_name} has shape {list(e.shape[1:])} but config.json implies "
                                    f"{list(want)}", os.path.join(self.path, "config.json"),
                                    "the config does not match the weights")

    # ------------------------------------------------------------------ rope

    def _head_dim(self) -> int:
        hp = self.hparams
        hd = (hp.get("head_dim") if self.hf_arch.head_dim_from_config else None) or self.hf_arch.defaults.get("head_dim")
        return int(hd) if hd else int(hp["hidden_size"]) // int(hp["num_attention_heads"])

    def _llama3_rope_factors(self) -> list[float] | None:
        rp = rope_parameters(self.hparams)
        full = rp.get("full_attention", rp)
        if str(full.get("rope_type", "")).lower() != "llama3":
            return None
        base = full.get("rope_theta", 10000.0)
        dim = self._head_dim()
        factor = full.get("factor", 8.0)
        low = full.get("low_freq_factor", 1.0)
        high = full.get("high_freq_factor", 4.0)
        old_ctx = full.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        out = []
        for k in range(0, dim, 2):
            freq = 1.0 / (base ** (k / dim))
            wavelen = 2 * math.pi / freq
            if wavelen < high_wavelen:
                out.append(1.0)
            elif wavelen > low_wavelen:
                out.append(float(factor))
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append(1.0 / ((1 - smooth) / factor + smooth))
        return out

    # ------------------------------------------------------------------ spec and metadata

    def _layer_is_sliding(self) -> list[bool] | None:
        hp = self.hparams
        n = int(hp["num_hidden_layers"])
        if isinstance(hp.get("layer_types"), list) and len(hp["layer_types"]) == n:
            return [t == "sliding_attention" for t in hp["layer_types"]]
        pattern = hp.get("sliding_window_pattern", hp.get("_sliding_window_pattern"))
        if self.hf_arch.key == "gemma3":
            pattern = int(pattern or 6)
            return [(i + 1) % pattern != 0 for i in range(n)]
        if self.hf_arch.key == "gemma2":       # llama.cpp: even layers slide, odd ones are global
            return [i % 2 == 0 for i in range(n)]
        return None

    def _sliding(self) -> tuple[int | None, list[bool] | None]:
        """(window, per-layer pattern) as llama.cpp will run the model."""
        hp, arch = self.hparams, self.hf_arch
        window = hp.get("sliding_window")
        if not window or arch.swa == "":
            return None, None
        if arch.swa in ("pattern", "always"):
            pattern = self._layer_is_sliding()
            if arch.swa == "pattern" and not (pattern and any(pattern)):
                return None, None
            return int(window), pattern
        if hp.get("use_sliding_window", True):
            return int(window), None
        return None, None

    def _make_spec(self) -> ArchSpec:
        hp, arch = self.hparams, self.hf_arch
        d = arch.defaults
        n_head = int(hp.get("num_attention_heads", d.get("num_attention_heads", 0)))
        embd = self._entries["token_embd.weight"]
        sliding, pattern = self._sliding()
        full = rope_parameters(hp)
        full = full.get("full_attention", full)
        theta = full.get("rope_theta", d.get("rope_theta"))
        n_embd = int(hp["hidden_size"])
        return ArchSpec(
            arch=arch.gguf_arch,
            n_layer=int(hp["num_hidden_layers"]),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(hp.get("num_key_value_heads") or d.get("num_key_value_heads") or n_head),
            head_dim=self._head_dim(),
            n_ff=int(hp["intermediate_size"]),
            n_vocab=embd.shape[0],
            n_ctx_train=int(first(hp, ("max_position_embeddings", "n_positions"), d.get("max_position_embeddings"))
                            or 0),
            tied_embeddings="output.weight" not in self._entries,
            sliding_window=sliding,
            sliding_window_pattern=pattern,
            norm=arch.norm,
            rope_theta=float(theta) if theta is not None else None,
            n_expert=int(first(hp, ("num_local_experts", "num_experts"), 0) or 0),
            n_expert_used=int(first(hp, ("num_experts_per_tok",), 0) or 0),
        )

    def _make_metadata(self) -> dict[str, MetaValue]:
        given = "head_dim" in self.hparams or "head_dim" in self.hf_arch.defaults
        return gguf_metadata(self.hparams, self.hf_arch, self.spec, self.path, given)

    # ------------------------------------------------------------------ ModelSource

    def tensors(self) -> list[TensorInfo]:
        out = []
        for name in self._order:
            e = self._entries[name]
            itemsize = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8}[e.stored_type]
            n = 1
            for s in e.shape:
                n *= s
            out.append(TensorInfo(name, e.shape, e.stored_type, n * itemsize))
        return out

    def hf_name(self, name: str) -> str:
        """The Hugging Face tensor a canonical tensor comes from."""
        return self._entries[name].hf_name

    def _get(self, hf_name: str, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, bool]:
        """A listed tensor in its stored dtype (rows r0:r1 of it), and whether it is a fresh
        buffer (safetensors) rather than a view of a memory-mapped .bin file. A part of a fused
        expert tensor is read alone (from safetensors, only its bytes)."""
        h = self._handles[self._raw_index[hf_name][0]]
        p = self._pieces.get(hf_name, Piece(hf_name))
        r0, r1 = rows if rows is not None else (0, p.r1 - p.r0 if p.expert is not None else -1)
        if p.expert is not None and not 0 <= r0 <= r1 <= p.r1 - p.r0:
            raise IndexError(f"rows {r0}:{r1} of {hf_name} with {p.r1 - p.r0} rows")
        if isinstance(h, _SafetensorsFile):
            if p.expert is not None:
                base = p.expert * h.entries[p.stored][1][1] + p.r0
                return h.get_rows(p.stored, base + r0, base + r1, flat=True), True
            return (h.get_rows(p.stored, r0, r1) if rows is not None else h.get_tensor(p.stored)), True
        t = h.get_tensor(p.stored) if hasattr(h, "get_tensor") else h[p.stored]
        if p.expert is not None:
            t = t[p.expert, p.r0:p.r1]
        return (t[r0:r1] if rows is not None else t), False

    def load_hf(self, hf_name: str) -> torch.Tensor | None:
        """A Hugging Face parameter as stored (float32, no GGUF transforms), or None if the
        checkpoint has no such tensor (tied output heads)."""
        if hf_name not in self._raw_index:
            return None
        t, fresh = self._get(hf_name)
        # a .bin tensor is a view of the memory-mapped file; a safetensors one is a fresh buffer
        return t.to(torch.float32, copy=not fresh).contiguous()

    def load_hf_rows(self, hf_name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of a Hugging Face parameter as stored, float32; from safetensors only
        those rows are read."""
        if hf_name not in self._raw_index:
            raise KeyError(f"{hf_name} is not a tensor of {self.path}")
        t, fresh = self._get(hf_name, (r0, r1))
        return t.to(torch.float32, copy=not fresh).contiguous()

    def load(self, name: str) -> torch.Tensor:
        try:
            e = self._entries[name]
        except KeyError:
            raise KeyError(f"{name} is not a tensor of {self.path}") from None
        if e.file is None:
            return torch.tensor(self._generated[name], dtype=torch.float32)
        if e.experts is not None:
            return torch.stack([self.load_hf(e.experts[i]) for i in range(len(e.experts))])
        try:
            t, fresh = self._get(e.hf_name)
        except Exception as ex:
            msg = str(ex).splitlines()[0] if str(ex) else ex.__class__.__name__
            raise QuantkitError(f"cannot read tensor {e.hf_name} ({msg})", e.file,
                                "the file is corrupt or truncated") from None
        # a .bin tensor is a view of the memory-mapped file: never hand that out to be modified
        t = t.to(torch.float32, copy=not fresh)
        if e.keep_rows is not None:
            t = t[: e.keep_rows]
        if e.permute_heads:
            t = permute_for_rope(t, e.permute_heads)
        if e.add:
            t = t + e.add
        return t.contiguous()

    def close(self) -> None:
        for h in self._handles.values():
            if isinstance(h, _SafetensorsFile):
                h.close()
        self._handles.clear()
