"""Models whose decoder blocks are loaded one at a time: a transformers skeleton (float32) with
only the tensors outside the blocks in memory, the model's own tokenizer (llama.cpp's for a
GGUF), and fetch(hf_name) that reads any tensor from the source on demand. Used by
quant.driver, behind the GPTQ-compensated GGUF export (quant.gguf_gptq) and the GPU checkpoint
export (quant.checkpoint)."""

from __future__ import annotations

import torch

from ..util.errors import QuantkitError
from ..util.finite import check_finite
from .pipeline import decoder_layers


class LlamaCppTokenizer:
    """The GGUF's own tokenizer through llama.cpp (vocab only), shaped like a Hugging Face
    tokenizer for quant.calib: tokenizer(text, add_special_tokens=False)["input_ids"]."""

    def __init__(self, path: str):
        from ..runtimes.llama_cpp import LlamaCpp
        self._rt = LlamaCpp(path, vocab_only=True)
        import llama_cpp as lib
        llm = self._rt.llm
        adds = bool(lib.llama_vocab_get_add_bos(lib.llama_model_get_vocab(llm.model)))
        self.bos_token_id = int(llm.token_bos()) if adds else None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self._rt.tokenize(text, add_bos=add_special_tokens)}


def streaming_model(src, path: str, lazy_embeddings: bool = False):
    """(transformers model skeleton in float32 with only the tensors outside the decoder blocks
    loaded, tokenizer, HF arch, fetch(hf_name) -> tensor) for a GGUF or HF-directory source.
    The blocks' parameters are allocated but never written until their block is loaded
    (quant.pipeline's load_block), so they take no memory before then. lazy_embeddings: the
    token embeddings are not loaded either (see `compact_embeddings`)."""
    from ..runtimes.torch import model_from_gguf
    from ..models.gguf import GGUFSource
    from ..models.gguf_hf import hf_tensor_reader
    if isinstance(src, GGUFSource):
        model, arch = model_from_gguf(path, load=False)
        tokenizer = LlamaCppTokenizer(path)
        # checkpoint names, one expert's matrix at a time: quant.moe.expert_fetch stacks a
        # layer's experts from them as it does a Hugging Face directory's
        fetch = hf_tensor_reader(src, arch)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers
            from transformers.modeling_utils import no_init_weights
        arch = src.hf_arch
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "vision_config", None) is None or getattr(config, "text_config", None) is None:
            fetch = src.load_hf
        else:
            # a vision-language model: its language model alone (the vision half is the mmproj file)
            from ..models.vision import language_model_names
            config = config.text_config

            def fetch(hf_name: str):
                for name in language_model_names(hf_name):
                    t = src.load_hf(name)
                    if t is not None:
                        return t
                return None
        config._attn_implementation = "eager"
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    _, _, prefix = decoder_layers(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    embed = model.get_input_embeddings().weight
    for name, p in model.named_parameters():
        if name.startswith(prefix + ".") or name == "lm_head.weight":
            continue                                 # blocks: later; the output head never runs here
        if lazy_embeddings and p is embed:
            continue
        t = fetch(name)
        if t is None:
            raise QuantkitError(f"the model has no tensor for {name}", path)
        p.data = t
    if tied:
        model.tie_weights()
    return model, tokenizer, arch, fetch


def block_loader(fetch, path: str):
    """load_block(index, prefix, layer) for quant.pipeline.quantize_model: fills a decoder
    block's parameters from `fetch` (checked for shape and NaN/Inf, named in the error)."""
    def load_block(i: int, lp: str, layer) -> None:
        for n, p in layer.named_parameters():
            t = fetch(f"{lp}.{n}")
            if t is None or t.shape != p.shape:
                raise QuantkitError(f"the model has no tensor of shape {tuple(p.shape)} for {lp}.{n}", path)
            check_finite(t, f"{lp}.{n}", path)
            p.data = t
    return load_block


def embedding_name(model) -> str:
    """The parameter name of a model's token embedding (the first name, when tied)."""
    w = model.get_input_embeddings().weight
    return next(n for n, p in model.named_parameters() if p is w)


def row_reader(src, arch):
    """rows(hf_name, r0, r1) -> float32 rows of a 2-D source tensor, reading only those rows
    (embeddings and output heads: no per-architecture transform applies to them)."""
    from ..models.arch import hf_to_gguf_name
    from ..models.gguf import GGUFSource
    if isinstance(src, GGUFSource):
        def rows(hf_name: str, r0: int, r1: int) -> torch.Tensor:
            return src.load_rows(hf_to_gguf_name(arch, hf_name), r0, r1)
        return rows
    if isinstance(getattr(src, "config", None), dict) and isinstance(src.config.get("vision_config"), dict):
        from ..models.vision import language_model_names

        def lm_rows(hf_name: str, r0: int, r1: int) -> torch.Tensor:   # a vision-language checkpoint
            for name in language_model_names(hf_name)[:-1]:
                try:
                    return src.load_hf_rows(name, r0, r1)
                except KeyError:
                    continue
            return src.load_hf_rows(language_model_names(hf_name)[-1], r0, r1)
        return lm_rows
    return src.load_hf_rows


EMBED_CHUNK_ROWS = 8192


@torch.no_grad()
def compact_embeddings(model, rows, input_ids: torch.Tensor) -> torch.Tensor:
    """Give the model's token embedding only the rows `input_ids` use, read through `rows`, and
    return the ids renumbered into it: capturing the calibration's block-0 inputs then needs a
    few MB instead of the whole table (0.67 GB in float32 for Gemma-3's 262k vocabulary). The
    embedding module itself runs (Gemma's scaling included), so its output is unchanged."""
    emb = model.get_input_embeddings()
    name = embedding_name(model)
    vocab, width = emb.num_embeddings, emb.embedding_dim
    uniq, inv = torch.unique(input_ids, return_inverse=True)
    if len(uniq) and (int(uniq[0]) < 0 or int(uniq[-1]) >= vocab):
        raise QuantkitError(f"calibration token ids run outside the vocabulary of {vocab}")
    table = torch.empty(len(uniq), width, dtype=torch.float32)
    for r0 in range(0, vocab, EMBED_CHUNK_ROWS):
        r1 = min(r0 + EMBED_CHUNK_ROWS, vocab)
        sel = (uniq >= r0) & (uniq < r1)
        if bool(sel.any()):
            table[sel] = rows(name, r0, r1)[uniq[sel] - r0]
    check_finite(table, name)
    emb.weight.data = table
    emb.padding_idx = None          # a gradient-only setting, and its id may lie past the compact table
    return inv.reshape(input_ids.shape)
