"""A GGUF's vocabulary (tokenizer.ggml.*) as Hugging Face tokenizer files that give llama.cpp's
token ids: the inverse of models.tokenizer_convert.

- "llama" (SentencePiece BPE: llama-2, mistral, gemma): llama.cpp merges the adjacent pair whose
  concatenation is the vocabulary piece with the highest score, then falls back to <0xXX> byte
  tokens. As a `tokenizers` BPE that is one merge (left, right) per way of splitting each piece
  into two pieces, ranked by the merged piece's score (ties: lower id first), byte_fallback on;
  spaces become "▁" and, with tokenizer.ggml.add_space_prefix (llama.cpp's default: true), one
  is put in front. A SentencePiece tokenizer.model with the same pieces, scores and types is
  written beside it, so the directory converts back to the same GGUF vocabulary.
- "gpt2" (byte-level BPE: llama-3, qwen2): the merges as stored, with the pre-tokenizer regex
  llama.cpp implements under tokenizer.ggml.pre.

Control and user-defined tokens become added tokens matched on the raw text (llama.cpp splits
user-defined ones out of the text even when it does not parse special tokens). BOS is added by
the post-processor when tokenizer.ggml.add_bos_token says so (llama.cpp's default for "llama":
yes). transformers' own GGUF tokenizer conversion is not used: it gives other ids for gemma3.
"""

from __future__ import annotations

import json
import os

from ..util.errors import QuantkitError
from .source import MetaValue
from .tokenizer_convert import BYTE, CONTROL, PRE_TOKENIZER_REGEXES, UNKNOWN, UNUSED, USER_DEFINED

SPACE = "\u2581"
_SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id",
                 "sep": "seperator_token_id", "cls": "cls_token_id", "mask": "mask_token_id"}


def _v(meta: dict[str, MetaValue], key: str, default=None):
    m = meta.get(key)
    return default if m is None else m.value


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a normal piece and whose halves are pieces, ranked by
    the merged piece's score (highest first; ties by id)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    ranked = []
    for piece, i in vocab.items():
        if types[i] != 1 or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], i, vocab[a], (a, b)))
    ranked.sort()
    return [m for *_, m in ranked]


def _added(tokens: list[str], types: list[int]) -> list[dict]:
    out = []
    for i, (t, typ) in enumerate(zip(tokens, types)):
        if typ in (CONTROL, USER_DEFINED, UNKNOWN):
            out.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": typ != USER_DEFINED})
    return out


def _post_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None,
                    add_bos: bool, add_eos: bool) -> dict | None:
    if not (add_bos and bos is not None) and not (add_eos and eos is not None):
        return None
    single, pair, special = [], [], {}
    if add_bos and bos is not None:
        single.append({"SpecialToken": {"id": bos, "type_id": 0}})
        special[bos] = {"id": bos, "ids": [bos_id], "tokens": [bos]}
    single.append({"Sequence": {"id": "A", "type_id": 0}})
    if add_eos and eos is not None:
        single.append({"SpecialToken": {"id": eos, "type_id": 0}})
        special[eos] = {"id": eos, "ids": [eos_id], "tokens": [eos]}
    pair = single + [x if "SpecialToken" in x else {"Sequence": {"id": "B", "type_id": 1}} for x in single]
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}


def _spm_json(meta, tokens, types) -> dict:
    scores = list(_v(meta, "tokenizer.ggml.scores", [0.0] * len(tokens)))
    space = bool(_v(meta, "tokenizer.ggml.add_space_prefix", True))
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk_id = _v(meta, "tokenizer.ggml.unknown_token_id")
    norm = [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    if space:
        norm.insert(0, {"type": "Prepend", "prepend": SPACE})
    decoder = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
               {"type": "Fuse"}]
    if space:
        decoder.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"normalizer": {"type": "Sequence", "normalizers": norm}, "pre_tokenizer": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk_id] if unk_id is not None else None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                      "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                      "merges": [list(m) for m in spm_merges(tokens, scores, types)]},
            "decoder": {"type": "Sequence", "decoders": decoder}}


def _gpt2_json(meta, tokens, path: str) -> dict:
    pre = str(_v(meta, "tokenizer.ggml.pre", "gpt-2"))
    regex = {name: rx for rx, name in PRE_TOKENIZER_REGEXES.items()}.get(pre)
    if regex is None and pre not in ("gpt-2", "default"):
        raise QuantkitError(f"pre-tokenizer '{pre}' has no Hugging Face spelling here", path,
                            "known: " + ", ".join(sorted(set(PRE_TOKENIZER_REGEXES.values()))))
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = [m.split(" ", 1) for m in _v(meta, "tokenizer.ggml.merges", [])]
    steps = [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": regex is None}]
    if regex is not None:
        steps.insert(0, {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False})
    return {"normalizer": None, "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": vocab, "merges": merges},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}}


def spm_model_proto(meta: dict[str, MetaValue], tokens: list[str], types: list[int]) -> bytes:
    """A SentencePiece BPE ModelProto holding the GGUF's pieces, scores and types."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    scores = list(_v(meta, "tokenizer.ggml.scores", [0.0] * len(tokens)))
    for t, s, typ in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score = t, float(s)
        p.type = typ if typ in (1, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else 1
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = any(t == BYTE for t in types)
    for field, key in (("unk_id", "unknown_token_id"), ("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"),
                       ("pad_id", "padding_token_id")):
        setattr(ts, field, int(_v(meta, f"tokenizer.ggml.{key}", -1)))
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(_v(meta, "tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return m.SerializeToString()


def write_tokenizer(meta: dict[str, MetaValue], directory: str, path: str = "") -> list[str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (and tokenizer.model for a
    SentencePiece vocabulary) in `directory`; returns the files written."""
    model = str(_v(meta, "tokenizer.ggml.model", "none"))
    if model not in ("llama", "gpt2"):
        raise QuantkitError(f"tokenizer model '{model}' cannot be written as Hugging Face files", path,
                            "supported: llama (SentencePiece), gpt2 (byte-level BPE)")
    tokens = list(_v(meta, "tokenizer.ggml.tokens"))
    types = [int(t) for t in _v(meta, "tokenizer.ggml.token_type", [1] * len(tokens))]
    body = _spm_json(meta, tokens, types) if model == "llama" else _gpt2_json(meta, tokens, path)
    special = {k: tokens[int(_v(meta, f"tokenizer.ggml.{key}"))] for k, key in _SPECIAL_KEYS.items()
               if _v(meta, f"tokenizer.ggml.{key}") is not None and 0 <= int(_v(meta, f"tokenizer.ggml.{key}")) < len(tokens)}
    add_bos = bool(_v(meta, "tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(_v(meta, "tokenizer.ggml.add_eos_token", False))
    ids = {k: int(_v(meta, f"tokenizer.ggml.{key}")) for k, key in _SPECIAL_KEYS.items() if k in special}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(tokens, types), **body,
           "post_processor": _post_processor(special.get("bos"), ids.get("bos"), special.get("eos"), ids.get("eos"),
                                             add_bos, add_eos)}
    written = []

    def put(name: str, obj) -> None:
        mode = "wb" if isinstance(obj, bytes) else "w"
        with open(os.path.join(directory, name), mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            if isinstance(obj, bytes):
                f.write(obj)
            else:
                json.dump(obj, f, ensure_ascii=False, indent=None if name == "tokenizer.json" else 2)
        written.append(name)

    put("tokenizer.json", tok)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000,
           "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
           "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                      "single_word", "special")}
                                    for a in tok["added_tokens"] if types[a["id"]] == CONTROL},
           **{f"{k}_token": v for k, v in special.items()}}
    if (tmpl := _v(meta, "tokenizer.chat_template")) is not None:
        cfg["chat_template"] = tmpl
    put("tokenizer_config.json", cfg)
    put("special_tokens_map.json", {f"{k}_token": v for k, v in special.items()})
    if model == "llama":
        put("tokenizer.model", spm_model_proto(meta, tokens, types))
    return written
