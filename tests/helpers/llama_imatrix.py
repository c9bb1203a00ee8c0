"""llama-imatrix's statistic collected from llama.cpp itself, through llama-cpp-python: the
scheduler's eval callback (llama_context_params.cb_eval, ggml_backend_sched_eval_callback) sees
every MUL_MAT whose weight (src[0]) is a `blk.*` tensor over at least 16 F32 tokens, as
tools/imatrix/imatrix.cpp's collect_imatrix does, and sums the squares of src[1]'s rows.

    sums, counts = llama_imatrix(gguf_path, ids)   # ids [chunks, tokens], BOS first in each
"""

from __future__ import annotations

import ctypes

import numpy as np


class _GGMLTensor(ctypes.Structure):
    """struct ggml_tensor of ggml.h (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    GGML_MAX_NAME 64)."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _weight_name(raw: bytes) -> str:
    """filter_tensor_name: CUDA0#blk.0.attn_k.weight#0 -> blk.0.attn_k.weight."""
    s = raw.decode()
    if "#" in s:
        s = s.split("#")[1]
    return s


def llama_imatrix(model_path: str, ids: np.ndarray, n_threads: int = 2):
    """({weight: float64 [n_per_row] sum of squared inputs}, {weight: tokens}) over the chunks
    `ids` [n, ctx], each decoded on an empty KV cache with every token's logits requested."""
    import llama_cpp
    from helpers.ggml_reference import libggml

    lib = libggml()
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    mul_mat = next(i for i in range(200) if lib.ggml_op_name(i) == b"MUL_MAT")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def collect(t_ptr, ask, user):
        t = ctypes.cast(t_ptr, ctypes.POINTER(_GGMLTensor)).contents
        if t.op != mul_mat or not t.src[0] or not t.src[1]:
            return False
        src0 = ctypes.cast(t.src[0], ctypes.POINTER(_GGMLTensor)).contents
        src1 = ctypes.cast(t.src[1], ctypes.POINTER(_GGMLTensor)).contents
        name = _weight_name(src0.name)
        if src1.ne[1] < 16 or src1.type != 0 or not name.startswith("blk."):      # type 0: F32
            return False
        if ask:
            return True
        ne0 = src1.ne[0]
        acc = sums.setdefault(name, np.zeros(ne0, dtype=np.float64))
        for i3 in range(src1.ne[3]):
            for i2 in range(src1.ne[2]):
                for r in range(src1.ne[1]):
                    addr = src1.data + r * src1.nb[1] + i2 * src1.nb[2] + i3 * src1.nb[3]
                    x = np.frombuffer((ctypes.c_float * ne0).from_address(addr), dtype=np.float32)
                    acc += x.astype(np.float64) ** 2
        counts[name] = counts.get(name, 0) + int(src1.ne[1] * src1.ne[2] * src1.ne[3])
        return True

    cb = llama_cpp.ggml_backend_sched_eval_callback(collect)
    n, ctx_len = ids.shape
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), mparams)
    assert model, model_path
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = ctx_len
    cparams.n_threads = cparams.n_threads_batch = n_threads
    cparams.cb_eval = cb
    cparams.type_k = cparams.type_v = 0          # an F32 KV cache: no fp16 rounding of keys and values
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    assert ctx
    batch = llama_cpp.llama_batch_init(ctx_len, 0, 1)
    try:
        for row in ids:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            batch.n_tokens = ctx_len
            for k, tok in enumerate(row):
                batch.token[k] = int(tok)
                batch.pos[k] = k
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = 0
                batch.logits[k] = True
            assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return sums, counts
