"""The tokenizer of a Hugging Face model directory as GGUF metadata (tokenizer.ggml.*).

Two kinds are understood, the ones Llama-family checkpoints ship:

- SentencePiece (`tokenizer.model`: llama-2, mistral, gemma): written as llama.cpp's "llama"
  vocabulary with pieces, scores and token types, the way convert_hf_to_gguf.py's
  `_create_vocab_sentencepiece` does.
- Byte-level BPE (`tokenizer.json` with a ByteLevel pre-tokenizer: llama-3, qwen2): written as
  "gpt2" with tokens, types and merges. llama.cpp re-implements each pre-tokenizer regex under a
  name (`tokenizer.ggml.pre`) and refuses names it does not know, so the pre-tokenizer of the
  tokenizer.json is recognised here by its regex (`PRE_TOKENIZER_REGEXES`) rather than by
  llama.cpp's hash of the encoded test string, which only matches published checkpoints.

Special token ids, add_bos/add_eos and the chat template follow gguf-py's `SpecialVocab`:
tokenizer.json's post-processor, then tokenizer_config.json, then config.json.

Reading needs `sentencepiece` (for tokenizer.model) and the standard library only; transformers
is not imported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from gguf import GGUFValueType

from quantkit.models.source import MetaValue, Tokenizer
from quantkit.util.errors import QuantkitError

# gguf TokenType values (gguf-py constants.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPECIAL_TOKEN_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")

# Pre-tokenizer regexes as tokenizer.json spells them (a Split before a ByteLevel with
# use_regex=false) -> the name llama.cpp implements them under (llama-vocab.cpp).
PRE_TOKENIZER_REGEXES: dict[str, str] = {
    # Llama 3 / 3.1 / 3.2 (llama.cpp: LLAMA_VOCAB_PRE_TYPE_LLAMA3)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    # Qwen2 / Qwen2.5: as Llama 3 but single digits (LLAMA_VOCAB_PRE_TYPE_QWEN2)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    # GPT-2's regex spelled out as a Split
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+":
        "gpt-2",
}
# ByteLevel(use_regex=true) applies GPT-2's regex itself (LLAMA_VOCAB_PRE_TYPE_GPT2).
PRE_BYTELEVEL_BUILTIN = "gpt-2"


@dataclass
class TokenizerSection:
    tokenizer: Tokenizer
    metadata: dict[str, MetaValue] = field(default_factory=dict)
    n_tokens: int = 0
    source_file: str = ""


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantkitError(f"cannot read JSON ({e.__class__.__name__}: {e})", path,
                            "the file is corrupt or truncated") from None


def _looks_special(token: str) -> bool:
    # convert_hf_to_gguf's does_token_look_special: added tokens some checkpoints forget to
    # mark special but that must be control tokens for llama.cpp.
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _str_array(values: list[str]) -> MetaValue:
    return MetaValue(values, GGUFValueType.ARRAY, GGUFValueType.STRING)


# ---------------------------------------------------------------------------------------------
# SentencePiece


def _protobuf_fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message level; value is bytes for
    length-delimited fields, int otherwise. Enough to read NormalizerSpec without protobuf."""
    i, n = 0, len(buf)

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            if i >= n:
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while i < n:
        key = varint()
        fnum, wtype = key >> 3, key & 7
        if wtype == 0:
            yield fnum, wtype, varint()
        elif wtype == 1:
            yield fnum, wtype, int.from_bytes(buf[i:i + 8], "little")
            i += 8
        elif wtype == 2:
            ln = varint()
            yield fnum, wtype, buf[i:i + ln]
            i += ln
        elif wtype == 5:
            yield fnum, wtype, int.from_bytes(buf[i:i + 4], "little")
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wtype}")


def spm_normalizer_flags(model_bytes: bytes) -> dict[str, bool]:
    """add_dummy_prefix / remove_extra_whitespaces / escape_whitespaces of a SentencePiece
    ModelProto (normalizer_spec is field 3; the flags are its fields 3, 4, 5, default true)."""
    flags = {"add_dummy_prefix": True, "remove_extra_whitespaces": True, "escape_whitespaces": True}
    names = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    for fnum, wtype, val in _protobuf_fields(model_bytes):
        if fnum == 3 and wtype == 2:
            for f2, w2, v2 in _protobuf_fields(val):
                if f2 in names and w2 == 0:
                    flags[names[f2]] = bool(v2)
    return flags


def _sentencepiece_vocab(model_dir: str, vocab_size: int | None, all_added_tokens: bool = False):
    """all_added_tokens: every token tokenizer.json adds overrides the piece (Phi-3's converter),
    not only those past the SentencePiece pieces."""
    path = os.path.join(model_dir, "tokenizer.model")
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:  # pragma: no cover - sentencepiece is a dependency
        raise QuantkitError("reading tokenizer.model needs the sentencepiece package", path,
                            "pip install sentencepiece") from None
    try:
        with open(path, "rb") as f:
            model_bytes = f.read()
        sp = SentencePieceProcessor()
        sp.LoadFromSerializedProto(model_bytes)
        flags = spm_normalizer_flags(model_bytes)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ messages
        raise QuantkitError(f"cannot load SentencePiece model ({str(e).splitlines()[0] if str(e) else e.__class__.__name__})",
                            path, "the file is corrupt or not a SentencePiece model") from None

    n_sp = sp.vocab_size()
    n = vocab_size or n_sp
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [UNUSED] * n
    for i in range(min(n, n_sp)):
        tokens[i] = sp.IdToPiece(i)
        scores[i] = float(sp.GetScore(i))
        if sp.IsUnknown(i):
            types[i] = UNKNOWN
        elif sp.IsControl(i):
            types[i] = CONTROL
        elif sp.IsUnused(i):
            types[i] = UNUSED
        elif sp.IsByte(i):
            types[i] = BYTE
        else:
            types[i] = NORMAL

    added_path = os.path.join(model_dir, "added_tokens.json")
    if os.path.isfile(added_path):
        for content, tid in _read_json(added_path).items():
            if 0 <= tid < n:
                tokens[tid], scores[tid], types[tid] = content, -1000.0, USER_DEFINED

    # tokens added past the SentencePiece pieces (Phi-3's chat tokens) as tokenizer.json lists
    # them; transformers 5 writes no added_tokens_decoder to tokenizer_config.json
    tj_path = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(tj_path):
        tj = _read_json(tj_path)
        for data in (tj.get("added_tokens") or []) if isinstance(tj, dict) else []:
            tid = data.get("id") if isinstance(data, dict) else None
            if isinstance(tid, int) and (0 if all_added_tokens else n_sp) <= tid < n \
                    and isinstance(data.get("content"), str):
                tokens[tid], scores[tid] = data["content"], -1000.0
                types[tid] = CONTROL if data.get("special") else USER_DEFINED

    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        decoder = _read_json(cfg_path).get("added_tokens_decoder", {}) or {}
        for sid, data in decoder.items():
            tid = int(sid)
            if not 0 <= tid < n:
                continue
            content = data["content"]
            if data.get("special") or _looks_special(content):
                types[tid] = CONTROL
            else:
                content = content.replace("\u2581", " ")  # llama.cpp expects user tokens pre-normalised
                types[tid] = USER_DEFINED
            tokens[tid], scores[tid] = content, -1000.0
    return path, tokens, scores, types, flags


# ---------------------------------------------------------------------------------------------
# byte-level BPE (tokenizer.json)


def recognise_pre_tokenizer(tok_json: dict, path: str) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regexes: list[str] = []
    byte_level = None
    for s in steps:
        kind = s.get("type")
        if kind == "Split":
            pattern = s.get("pattern", {})
            if "Regex" not in pattern or s.get("invert"):
                break
            regexes.append(pattern["Regex"])
        elif kind == "ByteLevel":
            byte_level = s
        else:
            regexes.append(f"<{kind}>")
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        if byte_level.get("use_regex", True):
            if not regexes:
                return PRE_BYTELEVEL_BUILTIN
        elif len(regexes) == 1 and regexes[0] in PRE_TOKENIZER_REGEXES:
            return PRE_TOKENIZER_REGEXES[regexes[0]]
    described = ", ".join(r if len(r) < 60 else r[:57] + "..." for r in regexes) or "none"
    raise QuantkitError(
        f"unrecognised byte-level BPE pre-tokenizer (regexes: {described}); llama.cpp "
        "needs a known tokenizer.ggml.pre", path,
        f"known: {', '.join(sorted(set(PRE_TOKENIZER_REGEXES.values())))}")


def _merges(tok_json: dict, path: str) -> list[str]:
    merges = (tok_json.get("model") or {}).get("merges") or []
    if merges and isinstance(merges[0], list):
        # transformers >= 4.45 writes pairs so that parts may hold spaces; llama.cpp splits on
        # the first space, so spaces inside a part are written as U+0120 (' ' + 256), as gguf-py does
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    if merges and not isinstance(merges[0], str):
        raise QuantkitError("unknown merges format in tokenizer.json", path)
    return list(merges)


def _bpe_vocab(model_dir: str, tok_json: dict, vocab_size: int | None):
    path = os.path.join(model_dir, "tokenizer.json")
    model = tok_json.get("model") or {}
    vocab: dict[str, int] = model.get("vocab") or {}
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    n_real = max([*vocab.values(), *added.keys()], default=-1) + 1
    n = vocab_size or n_real
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i in added:
            a = added[i]
            tok = a["content"]
            if a.get("special") or _looks_special(tok):
                types.append(CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(USER_DEFINED)
            tokens.append(tok)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    return path, tokens, types, _merges(tok_json, path)


# ---------------------------------------------------------------------------------------------
# special tokens, BOS/EOS, chat template (gguf-py SpecialVocab)


def _content_of(entry) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _post_processor_adds(tok_json: dict | None, tcfg: dict, add: dict[str, bool]) -> None:
    """add_bos / add_eos from tokenizer.json's post-processor (tcfg's bos/eos filled in from it)."""
    pp = (tok_json or {}).get("post_processor") or {}
    for proc in pp.get("processors", [pp]) if pp else []:
        kind = proc.get("type")
        if kind == "ByteLevel":
            add.setdefault("bos", False)
            add.setdefault("eos", False)
        elif kind == "TemplateProcessing":
            # crude, like SpecialVocab: a special token in front of $A means add_bos, one
            # behind it add_eos; a bare "$A" adds nothing (said explicitly, so that
            # llama.cpp's per-pre-tokenizer defaults cannot add a BOS transformers does not)
            single = proc.get("single", [])
            if len(single) <= 1:
                add.setdefault("bos", False)
                add.setdefault("eos", False)
                continue
            bos = _content_of(tcfg.get("bos_token")) or _content_of(tcfg.get("cls_token"))
            first = single[0].get("SpecialToken", {}).get("id")
            last = single[-1].get("SpecialToken", {}).get("id")
            if first:
                if not bos:
                    tcfg["bos_token"] = bos = first
                add["bos"] = first == bos
            if last:
                if _content_of(tcfg.get("eos_token")) != last:
                    tcfg["eos_token"] = last
                add["eos"] = True
            _pair_adds_sep(proc.get("pair") or [], first, last, tcfg, add)


def _pair_adds_sep(pair: list, first, last, tcfg: dict, add: dict[str, bool]) -> None:
    """add_sep from the pair template "[first] A <middle> B [last]", as SpecialVocab reads it:
    true when the middle holds the separator (or EOS) token."""
    if pair and first and pair[0].get("SpecialToken", {}).get("id") == first:
        pair = pair[1:]
    if pair and last and pair[-1].get("SpecialToken", {}).get("id") == last:
        pair = pair[:-1]
    if len(pair) < 3 or pair[0].get("Sequence", {}).get("id") != "A" or pair[-1].get("Sequence", {}).get("id") != "B":
        return
    middle = pair[1:-1]
    seps = {_content_of(tcfg.get("sep_token")), _content_of(tcfg.get("eos_token"))} - {None}
    ids = [m.get("SpecialToken", {}).get("id") for m in middle[:2]]
    add["sep"] = bool((ids[0] in seps and not last) or (len(ids) == 2 and ids[1] in seps))


def _special_ids(tok_json: dict | None, tcfg: dict, tokens: list[str], config: dict,
                 add: dict[str, bool]) -> dict[str, int]:
    """Special token ids from tokenizer_config.json (by content), then config.json's *_token_id."""
    ids: dict[str, int] = {}
    n = len(tokens)
    added_tokens = (tok_json or {}).get("added_tokens", [])
    for typ in SPECIAL_TOKEN_TYPES:
        entry = tcfg.get(f"add_{typ}_token")
        if isinstance(entry, bool) and typ not in add:
            add[typ] = entry
        content = _content_of(tcfg.get(f"{typ}_token"))
        if content is None:
            continue
        tid = next((a.get("id") for a in added_tokens if a.get("content") == content), None)
        if tid is None and content in tokens:
            tid = tokens.index(content)
        if isinstance(tid, int) and 0 <= tid < n:
            ids.setdefault(typ, tid)
    for typ in SPECIAL_TOKEN_TYPES:
        tid = config.get(f"{typ}_token_id")
        if tid is None and isinstance(config.get("text_config"), dict):
            tid = config["text_config"].get(f"{typ}_token_id")
        if isinstance(tid, list):  # some configs list several eos ids; llama.cpp takes one
            tid = tid[0] if tid else None
        if isinstance(tid, int) and 0 <= tid < n:
            ids.setdefault(typ, tid)
    return ids


def _chat_template_meta(model_dir: str, tcfg: dict) -> dict[str, MetaValue]:
    """tokenizer.chat_template (and named templates) from tokenizer_config.json or its own files."""
    meta: dict[str, MetaValue] = {}
    template = tcfg.get("chat_template")
    if template is None:
        jinja = os.path.join(model_dir, "chat_template.jinja")
        cjson = os.path.join(model_dir, "chat_template.json")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        elif os.path.isfile(cjson):
            template = _read_json(cjson).get("chat_template")
    if isinstance(template, str):
        meta["tokenizer.chat_template"] = MetaValue(template, GGUFValueType.STRING)
    elif isinstance(template, list):
        names = []
        for choice in template:
            name = "".join(c if c.isascii() and c.isalnum() else "_" for c in choice.get("name", ""))
            body = choice.get("template")
            if not name or body is None:
                continue
            if name == "default":
                meta["tokenizer.chat_template"] = MetaValue(body, GGUFValueType.STRING)
            else:
                names.append(name)
                meta[f"tokenizer.chat_template.{name}"] = MetaValue(body, GGUFValueType.STRING)
        if names:
            meta["tokenizer.chat_templates"] = _str_array(names)
    return meta


_SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                 "sep": "seperator_token_id", "pad": "padding_token_id", "cls": "cls_token_id",
                 "mask": "mask_token_id"}


def _special_vocab(model_dir: str, tok_json: dict | None, tokens: list[str], config: dict) -> dict[str, MetaValue]:
    """What gguf-py's SpecialVocab writes: special token ids, add_bos/add_eos, chat templates."""
    meta: dict[str, MetaValue] = {}
    add: dict[str, bool] = {}
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    tcfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    if tok_json:
        _post_processor_adds(tok_json, tcfg, add)
    ids = _special_ids(tok_json, tcfg, tokens, config, add)
    for typ, tid in ids.items():
        meta[f"tokenizer.ggml.{_SPECIAL_KEYS[typ]}"] = MetaValue(int(tid), GGUFValueType.UINT32)
    for typ in ("bos", "eos", "sep"):
        if typ in add:
            meta[f"tokenizer.ggml.add_{typ}_token"] = MetaValue(bool(add[typ]), GGUFValueType.BOOL)
    meta.update(_chat_template_meta(model_dir, tcfg))
    return meta


# ---------------------------------------------------------------------------------------------


def convert_tokenizer(model_dir: str, config: dict, vocab_size: int | None,
                      add_space_prefix: bool | None = None, all_added_tokens: bool = False) -> TokenizerSection:
    """The tokenizer.* metadata of an HF model directory.

    vocab_size: rows of the embedding (the token list is padded to it, as convert_hf_to_gguf
    does); add_space_prefix: an architecture's fixed choice for SentencePiece vocabularies
    (Gemma: False), None to take it from tokenizer_config.json / the SentencePiece model."""
    spm_path = os.path.join(model_dir, "tokenizer.model")
    json_path = os.path.join(model_dir, "tokenizer.json")
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    tok_json = _read_json(json_path) if os.path.isfile(json_path) else None
    tcfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}

    if os.path.isfile(spm_path):
        path, tokens, scores, types, flags = _sentencepiece_vocab(model_dir, vocab_size, all_added_tokens)
        meta: dict[str, MetaValue] = {
            "tokenizer.ggml.model": MetaValue("llama", GGUFValueType.STRING),
            "tokenizer.ggml.pre": MetaValue("default", GGUFValueType.STRING),
            "tokenizer.ggml.tokens": _str_array(tokens),
            "tokenizer.ggml.scores": MetaValue(scores, GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
            "tokenizer.ggml.token_type": MetaValue(types, GGUFValueType.ARRAY, GGUFValueType.INT32),
        }
        space = add_space_prefix
        if space is None and isinstance(tcfg.get("add_prefix_space"), bool):
            space = tcfg["add_prefix_space"]
        if space is None and not flags["add_dummy_prefix"]:
            # llama.cpp assumes a SentencePiece model adds the dummy prefix; say so when it does not
            space = False
        if space is not None:
            meta["tokenizer.ggml.add_space_prefix"] = MetaValue(bool(space), GGUFValueType.BOOL)
        meta.update(_special_vocab(model_dir, tok_json, tokens, config))
        tok = Tokenizer(model="llama", pre="default", n_tokens=len(tokens),
                        extra={"file": "tokenizer.model", **flags})
        return TokenizerSection(tok, meta, len(tokens), path)

    if tok_json is not None:
        model = tok_json.get("model") or {}
        if model.get("type") != "BPE":
            raise QuantkitError(f"tokenizer.json holds a {model.get('type')!r} model; only byte-level BPE "
                                "(or a tokenizer.model) is supported", json_path)
        decoder = tok_json.get("decoder") or {}
        pre = tok_json.get("pre_tokenizer") or {}
        byte_level = "ByteLevel" in json.dumps([pre, decoder])
        if not byte_level:
            raise QuantkitError("tokenizer.json is a SentencePiece-style BPE without byte-level "
                                "encoding and there is no tokenizer.model beside it", json_path,
                                "add the model's tokenizer.model")
        pre_name = recognise_pre_tokenizer(tok_json, json_path)
        path, tokens, types, merges = _bpe_vocab(model_dir, tok_json, vocab_size)
        meta = {
            "tokenizer.ggml.model": MetaValue("gpt2", GGUFValueType.STRING),
            "tokenizer.ggml.pre": MetaValue(pre_name, GGUFValueType.STRING),
            "tokenizer.ggml.tokens": _str_array(tokens),
            "tokenizer.ggml.token_type": MetaValue(types, GGUFValueType.ARRAY, GGUFValueType.INT32),
            "tokenizer.ggml.merges": _str_array(merges),
        }
        meta.update(_special_vocab(model_dir, tok_json, tokens, config))
        tok = Tokenizer(model="gpt2", pre=pre_name, n_tokens=len(tokens),
                        extra={"file": "tokenizer.json", "n_merges": len(merges)})
        return TokenizerSection(tok, meta, len(tokens), path)

    raise QuantkitError("no tokenizer: neither tokenizer.model (SentencePiece) nor tokenizer.json (BPE) is "
                        "here, and a GGUF file carries the model's vocabulary", model_dir,
                        "copy the model's tokenizer.json or tokenizer.model into the directory")
