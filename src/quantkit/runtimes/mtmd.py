"""llama.cpp's multimodal runtime (tools/mtmd, libmtmd through llama-cpp-python's `mtmd_cpp`):
a language-model GGUF and its mmproj file loaded as a pair, an image's embeddings as the
projector computes them, and greedy generation from a prompt holding an image."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from ..util.errors import QuantkitError
from .llama_cpp import LlamaCpp, quiet_stderr


@dataclass
class ImageGeneration:
    text: str
    tokens: list[int]
    prompt_positions: int       # context positions the prompt took, image included
    image_tokens: int           # embeddings the image became
    prompt_tokens: list[int]    # the prompt as llama.cpp fed it: token ids, -1 where an image embedding went


class MtmdPair:
    """A language model and its multimodal projector in llama.cpp (CPU)."""

    def __init__(self, model_path: str, mmproj_path: str, n_ctx: int = 512, n_threads: int | None = None):
        from llama_cpp import mtmd_cpp

        self._m = mtmd_cpp
        self.rt = LlamaCpp(model_path, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_ctx)
        self.llm = self.rt.llm
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = self.rt.n_threads
        params.warmup = False
        with quiet_stderr():
            self.ctx = mtmd_cpp.mtmd_init_from_file(os.fsencode(mmproj_path), self.llm.model, params)
        if not self.ctx:
            self.rt.close()
            raise QuantkitError("llama.cpp's multimodal runtime could not load the projector", mmproj_path,
                                "it must be the mmproj file written for this language model")
        self.n_embd = int(self.llm.n_embd())

    def _chunks(self, prompt: str, rgb: np.ndarray):
        """mtmd_tokenize of `prompt` (which holds one media marker) and one image."""
        m = self._m
        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an RGB image of shape (h, w, 3), got {img.shape}")
        h, w = img.shape[:2]
        bitmap = m.mtmd_bitmap_init(w, h, img.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = m.mtmd_input_chunks_init()
        text = m.mtmd_input_text()
        data = prompt.encode("utf-8")
        text.text, text.text_len, text.add_special, text.parse_special = data, len(data), True, True
        try:
            arr = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            with quiet_stderr():
                rc = m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), arr, 1)
        finally:
            m.mtmd_bitmap_free(bitmap)
        if rc != 0:
            m.mtmd_input_chunks_free(chunks)
            raise QuantkitError(f"mtmd_tokenize failed ({rc})", hint="the prompt must hold one media marker")
        return chunks

    def marker(self) -> str:
        return self._m.mtmd_default_marker().decode()

    def image_embedding(self, rgb: np.ndarray) -> np.ndarray:
        """The projector's output for one image: float32 [image tokens, language model hidden]."""
        m = self._m
        chunks = self._chunks(self.marker(), rgb)
        try:
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n = int(m.mtmd_input_chunk_get_n_tokens(chunk))
                with quiet_stderr():
                    rc = m.mtmd_encode_chunk(self.ctx, chunk)
                if rc != 0:
                    raise QuantkitError(f"mtmd_encode_chunk failed ({rc})")
                ptr = m.mtmd_get_output_embd(self.ctx)
                return np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
        finally:
            m.mtmd_input_chunks_free(chunks)
        raise QuantkitError("the image produced no image chunk")

    def generate(self, prompt: str, rgb: np.ndarray, max_tokens: int = 16) -> ImageGeneration:
        """Greedy continuation of `prompt` (holding marker() where the image goes)."""
        import llama_cpp as lc

        m = self._m
        lctx = self.llm.ctx
        chunks = self._chunks(prompt, rgb)
        try:
            ids: list[int] = []
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    ids += [int(ptr[j]) for j in range(n.value)]
                else:
                    ids += [-1] * int(m.mtmd_input_chunk_get_n_tokens(chunk))
            lc.llama_memory_clear(lc.llama_get_memory(lctx), True)
            n_past = lc.llama_pos(0)
            with quiet_stderr():
                rc = m.mtmd_helper_eval_chunks(self.ctx, lctx, chunks, 0, 0, self.llm.n_batch, True,
                                               ctypes.byref(n_past))
            if rc != 0:
                raise QuantkitError(f"mtmd_helper_eval_chunks failed ({rc})")
        finally:
            m.mtmd_input_chunks_free(chunks)
        vocab = lc.llama_model_get_vocab(self.llm.model)
        n_vocab = int(lc.llama_vocab_n_tokens(vocab))
        pos0 = int(n_past.value)
        out: list[int] = []
        for _ in range(max_tokens):
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(lctx, -1), shape=(n_vocab,))
            tok = int(np.argmax(logits))
            if lc.llama_vocab_is_eog(vocab, tok):
                break
            out.append(tok)
            arr = (lc.llama_token * 1)(tok)
            batch = lc.llama_batch_get_one(arr, 1)
            with quiet_stderr():
                if lc.llama_decode(lctx, batch) != 0:
                    raise QuantkitError("llama_decode failed while generating")
        text = self.llm.detokenize(out).decode("utf-8", errors="replace")
        return ImageGeneration(text=text, tokens=out, prompt_positions=pos0, image_tokens=ids.count(-1),
                              prompt_tokens=ids)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._m.mtmd_free(self.ctx)
            self.ctx = None
        self.rt.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
