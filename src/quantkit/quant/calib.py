"""Calibration tokens for GPTQ: a UTF-8 text tokenized with the model's own tokenizer, cut into
N consecutive chunks of `seqlen` tokens, each starting with BOS when the tokenizer has one (as
llama-imatrix chunks and the evaluation's chunks do, so the calibration sees the same attention
sink the model sees at run time). Default text: wikitext-2 valid, shipped in quantkit/data."""

from __future__ import annotations

import os

import torch

from ..recipe import CALIB_TEXT, DEFAULT_NSAMPLES, DEFAULT_SEQLEN  # noqa: F401  (defaults live in recipe)
from ..util.errors import QuantkitError


def default_calibration_file() -> str:
    """wikitext-2 valid, shipped in quantkit/data."""
    from ..util.data import data_file
    return data_file(CALIB_TEXT)


def read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise QuantkitError("no such calibration file", path, "pass --calib FILE (any UTF-8 text)")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise QuantkitError(f"calibration file is not UTF-8 text ({e.reason} at byte {e.start})", path) from None


def leading_bos(tokenizer) -> int | None:
    """The BOS id if the tokenizer starts an encoded text with it, else None: a tokenizer may
    define a BOS token without adding it (GPT-2's byte-level BPE, a converted GGUF whose
    add_bos_token is false), and then neither transformers nor llama.cpp (llama-imatrix) puts one
    before the text, so the calibration does not either."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if list(full[:1]) == [bos] and list(full[1:1 + len(plain)]) == list(plain) else None


def calibration_ids(tokenizer, path: str | None = None, nsamples: int = DEFAULT_NSAMPLES,
                    seqlen: int = DEFAULT_SEQLEN) -> torch.Tensor:
    """LongTensor [nsamples, seqlen]: consecutive chunks of the text's tokens, BOS first where the
    tokenizer puts one before a text (leading_bos). `tokenizer`: a Hugging Face tokenizer (the
    model's own)."""
    if nsamples <= 0 or seqlen <= 1:
        raise QuantkitError(f"need at least 1 sample of at least 2 tokens (got {nsamples} x {seqlen})")
    path = path or default_calibration_file()
    text = read_text(path)
    bos = leading_bos(tokenizer)
    per = seqlen - 1 if bos is not None else seqlen
    need = nsamples * per
    # tokenize ~64 KB pieces cut at line ends until there are enough tokens: a large file
    # costs only what is used
    ids: list[int] = []
    pos = 0
    while pos < len(text) and len(ids) < need:
        end = text.find("\n", pos + 65536)
        end = len(text) if end < 0 else end + 1
        ids += tokenizer(text[pos:end], add_special_tokens=False)["input_ids"]
        pos = end
    if len(ids) < need:
        raise QuantkitError(f"calibration text too short: it has {len(ids):,} tokens, {nsamples} samples x "
                            f"{seqlen} tokens need {need:,}", path,
                            "give a longer --calib file or lower --nsamples / --seqlen")
    chunks = torch.tensor(ids[:need], dtype=torch.long).reshape(nsamples, per)
    if bos is not None:
        chunks = torch.cat([torch.full((nsamples, 1), bos, dtype=torch.long), chunks], dim=1)
    return chunks
