"""What the headers of a model say, without running it: parameters, bytes, tensor types, bits
per weight and vocabulary, of a GGUF, a Hugging Face directory, or a GPTQ / compressed-tensors
checkpoint directory (safetensors headers; a packed linear counts out x in parameters)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..runtimes import runtime_kind, split_spec
from ..util.errors import QuantkitError


@dataclass
class ModelFacts:
    path: str
    runtime: str
    n_params: int
    file_bytes: int
    tensor_bytes: int
    linear_params: int
    linear_bytes: int
    types: dict[str, int]
    all_f32: bool
    vocab: list[str]


def describe(spec: str) -> ModelFacts:
    """Sizes, tensor types and vocabulary from the file headers (opening the model names the
    file and the reason when it is damaged)."""
    from ..models.open import open_model
    kind = runtime_kind(spec)
    path = split_spec(spec)[0]
    if os.path.isdir(path) and _quantization_config(path):
        return _describe_quantized_dir(spec, path)
    with open_model(path) as src:
        tensors = src.tensors()
        toks = src.metadata.get("tokenizer.ggml.tokens")
        vocab = [str(t) for t in (toks.value if toks is not None else [])]
    linear = [t for t in tensors if len(t.shape) >= 2 and t.name.startswith("blk.")]
    types: dict[str, int] = {}
    for t in tensors:
        types[t.type] = types.get(t.type, 0) + 1
    if os.path.isdir(path):
        file_bytes = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                         if n.endswith((".safetensors", ".bin")))
    else:
        file_bytes = os.path.getsize(path)
    return ModelFacts(path=spec, runtime=kind, n_params=sum(t.n_elements for t in tensors), file_bytes=file_bytes,
                      tensor_bytes=sum(t.nbytes for t in tensors),
                      linear_params=sum(t.n_elements for t in linear), linear_bytes=sum(t.nbytes for t in linear),
                      types=types, all_f32=all(t.type == "f32" for t in tensors), vocab=vocab)


def _quantization_config(path: str) -> dict | None:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None


def _describe_quantized_dir(spec: str, path: str) -> ModelFacts:
    """ModelFacts of a GPTQ or compressed-tensors checkpoint directory, from its safetensors
    headers (logical parameter counts: a packed linear counts out x in) and its tokenizer's
    vocabulary (transformers)."""
    from safetensors import safe_open
    qc = _quantization_config(path) or {}
    if qc.get("quant_method") == "gptq":
        bits, gs = qc.get("bits"), qc.get("group_size")
    else:
        w = next(iter((qc.get("config_groups") or {}).values()), {}).get("weights") or {}
        bits, gs = w.get("num_bits"), w.get("group_size") or -1
    label = f"int{bits}-g{gs}" if bits else "packed"
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise QuantkitError("no *.safetensors in the checkpoint directory", path)
    nbytes: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    packed_shape: dict[str, tuple[int, int]] = {}
    for fn in files:
        with safe_open(os.path.join(path, fn), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                dt = sl.get_dtype()
                shapes[name], dtypes[name] = shape, dt
                n = 1
                for d in shape:
                    n *= d
                nbytes[name] = n * {"F64": 8, "F32": 4, "I32": 4, "I64": 8, "F16": 2, "BF16": 2}.get(dt, 1)
                if name.endswith(".weight_shape"):
                    packed_shape[name.rsplit(".", 1)[0]] = tuple(int(x) for x in f.get_tensor(name).tolist())
    for name, shape in shapes.items():          # GPTQ layout: g_idx [in], scales [groups, out]
        if name.endswith(".g_idx"):
            prefix = name.rsplit(".", 1)[0]
            packed_shape.setdefault(prefix, (shapes[prefix + ".scales"][1], shape[0]))
    n_params = linear_params = linear_bytes = 0
    types: dict[str, int] = {}
    for name, shape in shapes.items():
        prefix = name.rsplit(".", 1)[0]
        is_linear = prefix in packed_shape
        if is_linear:
            linear_bytes += nbytes[name]
        else:
            n = 1
            for d in shape:
                n *= d
            n_params += n
            types[dtypes[name].lower()] = types.get(dtypes[name].lower(), 0) + 1
    for out_f, in_f in packed_shape.values():
        n_params += out_f * in_f
        linear_params += out_f * in_f
    types[label] = len(packed_shape)
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        vocab = [str(t) for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
    except Exception as e:  # noqa: BLE001 - the checkpoint's tokenizer is the user's file
        raise QuantkitError(f"transformers could not read the checkpoint's tokenizer ({type(e).__name__})", path,
                            "the directory needs tokenizer files (tokenizer.json / tokenizer.model)") from None
    return ModelFacts(path=spec, runtime="torch", n_params=n_params,
                      file_bytes=sum(os.path.getsize(os.path.join(path, fn)) for fn in files),
                      tensor_bytes=sum(nbytes.values()), linear_params=linear_params, linear_bytes=linear_bytes,
                      types=types, all_f32=False, vocab=vocab)


def check_same_vocab(ref: ModelFacts, other: ModelFacts) -> None:
    if ref.vocab == other.vocab:
        return
    # SentencePiece's word boundary: '▁' in Hugging Face vocabularies, a space in some GGUFs
    if len(ref.vocab) == len(other.vocab) and all(a.replace("\u2581", " ") == b.replace("\u2581", " ")
                                                  for a, b in zip(ref.vocab, other.vocab)):
        return
    if len(ref.vocab) != len(other.vocab):
        why = f"{len(other.vocab)} tokens vs the reference's {len(ref.vocab)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(ref.vocab, other.vocab)) if a != b)
        why = f"token {i} is {other.vocab[i]!r}, the reference's is {ref.vocab[i]!r}"
    raise QuantkitError(f"vocabulary differs from the reference {os.path.basename(ref.path)} ({why})", other.path,
                        "models are scored on the same token ids; compare models that share a tokenizer")
