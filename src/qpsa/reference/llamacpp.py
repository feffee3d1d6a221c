"""llama.cpp as a reference, through llama-cpp-python (optional: `pip install llama-cpp-python`).

Used by tests and benchmarks to check q-psa against llama.cpp on the same file and text:
token ids, and perplexity computed with llama-perplexity's own protocol (only the scored half of
each window asks for logits, BOS replaces each window's first token where the vocabulary adds it);
and `ggml_quantize`, ggml's own quantizer, to check `qpsa.gguf.quants.quantize` byte for byte.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from qpsa.errors import QpsaError

_SILENCE = None  # the ctypes log callback must outlive every call into llama.cpp


def _llama_cpp():
    global _SILENCE
    try:
        import llama_cpp
    except ImportError:
        raise QpsaError("the llama.cpp reference needs llama-cpp-python: pip install llama-cpp-python") from None
    if _SILENCE is None:  # llama.cpp logs every tensor to stderr; keep the benchmarks readable
        _SILENCE = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_SILENCE, ctypes.c_void_p(0))
    return llama_cpp


@dataclass
class LlamaCppPerplexity:
    ppl: float
    ppl_se: float
    n_windows: int
    seconds_per_window: float
    token_nll: np.ndarray  # (n_scored,) float64


class LlamaCpp:
    """A llama.cpp model and context with `ctx` positions, on `threads` CPU threads.

    `f32_attention`: keep keys and values in float32 and turn flash attention off (llama.cpp's
    defaults store them in float16 and may use its flash kernel, which rounds to float16): the
    forward in float32 throughout, for checking another engine's arithmetic rather than llama.cpp's
    cache precision."""

    def __init__(self, path, ctx: int = 512, threads: int | None = None, f32_attention: bool = False):
        lc = self.lc = _llama_cpp()
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise QpsaError(f"{path}: llama.cpp could not load it")
        self.vocab = lc.llama_model_get_vocab(self.model)
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = ctx
        cparams.n_batch = ctx
        cparams.n_ubatch = ctx
        cparams.n_seq_max = 1
        threads = threads or os.cpu_count()
        cparams.n_threads = cparams.n_threads_batch = threads
        if f32_attention:
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
            cparams.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx_ptr = lc.llama_init_from_model(self.model, cparams)
        self.n_ctx = ctx
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self.vocab))
        self.bos = lc.llama_vocab_bos(self.vocab)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (self.lc.llama_token * n_max)()
        n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, False)
        if n < 0:
            raise QpsaError("llama.cpp tokenization failed")
        return list(buf[:n])

    def window_logits(self, tokens: list[int], first: int) -> np.ndarray:
        """Logits (len(tokens) - first, V) for positions first … end, on a cleared cache."""
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx_ptr), True)
        n = len(tokens)
        batch = lc.llama_batch_init(n, 0, 1)
        try:
            for i, tok in enumerate(tokens):
                batch.token[i] = tok
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i >= first
            batch.n_tokens = n
            if lc.llama_decode(self.ctx_ptr, batch) != 0:
                raise QpsaError("llama.cpp decode failed")
            out = np.empty((n - first, self.n_vocab), dtype=np.float32)
            for j, i in enumerate(range(first, n)):
                ptr = lc.llama_get_logits_ith(self.ctx_ptr, i)
                out[j] = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,))
            return out
        finally:
            lc.llama_batch_free(batch)

    def perplexity(self, text: str, chunks: int | None = None) -> LlamaCppPerplexity:
        """llama-perplexity's protocol over windows of n_ctx tokens."""
        ctx = self.n_ctx
        ids = self.tokenize(text, self.add_bos)
        n = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
        first = ctx // 2
        nlls, seconds = [], 0.0
        for w in range(n):
            window = ids[w * ctx : (w + 1) * ctx]
            if self.add_bos:
                window[0] = self.bos
            t = time.perf_counter()
            logits = self.window_logits(window, first)[:-1].astype(np.float64)  # (S, V)
            seconds += time.perf_counter() - t
            targets = np.array(window[first + 1 :])
            m = logits.max(axis=1, keepdims=True)
            logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
            nlls.append(logz - logits[np.arange(len(targets)), targets])
        nll = np.concatenate(nlls)
        mean = float(nll.mean())
        var = float((nll**2).mean() - mean * mean)
        ppl = math.exp(mean)
        return LlamaCppPerplexity(ppl, math.sqrt(var / (len(nll) - 1)) * ppl, n, seconds / n, nll)

    def close(self):
        self.lc.llama_free(self.ctx_ptr)
        self.lc.llama_model_free(self.model)


def llama_quantize(src, dst, file_type: int, threads: int | None = None, pure: bool = False) -> None:
    """llama-quantize --allow-requantize SRC DST TYPE, through llama.cpp's own C function.

    `file_type` is a LLAMA_FTYPE_MOSTLY_* value (gguf.LlamaFileType), no importance matrix.
    """
    lc = _llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.allow_requantize = True
    params.pure = pure
    params.nthread = threads or os.cpu_count() or 1
    if lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise QpsaError(f"{src}: llama.cpp could not quantize it")


_GGML_BASE = None


def _ggml_base():
    """The libggml-base.so bundled with llama-cpp-python, with ggml_quantize_chunk's signature declared."""
    global _GGML_BASE
    if _GGML_BASE is None:
        lc = _llama_cpp()
        lib = ctypes.CDLL(os.path.join(os.path.dirname(lc.__file__), "lib", "libggml-base.so"))
        # size_t ggml_quantize_chunk(enum ggml_type, const float *src, void *dst, int64_t start,
        #                            int64_t nrows, int64_t n_per_row, const float *imatrix)
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        _GGML_BASE = lib
    return _GGML_BASE


def ggml_quantize(values: np.ndarray, qtype, weights: np.ndarray | None = None) -> np.ndarray:
    """ggml's own quantizer, as llama-quantize runs it on a tensor (one expert's matrix).

    values: float32 (..., n), n a multiple of the type's block size -> uint8 (..., n // block_size * type_size),
    from ggml_quantize_chunk(qtype, values, ..., imatrix) in llama-cpp-python's libggml-base.so, with
    imatrix = `weights` (float32 (n,), one importance per column: llama-quantize's in_sum2 / count) or NULL.
    ggml aborts the process on arguments it rejects, so they are checked here first.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType(qtype)
    lib = _ggml_base()
    if weights is None and lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise QpsaError(f"ggml cannot quantize to {qtype.name} without an importance matrix")
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim == 0:
        raise QpsaError("ggml_quantize needs at least one dimension")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_per_row = values.shape[-1]
    if n_per_row % block_size:
        raise QpsaError(f"{qtype.name}: row length {n_per_row} is not a multiple of the block size {block_size}")
    n_rows = values.size // n_per_row if n_per_row else 0
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if weights.shape != (n_per_row,):
            raise QpsaError(f"ggml_quantize: weights must have shape ({n_per_row},), got {weights.shape}")
    imatrix = None if weights is None else weights.ctypes.data
    out = np.empty((n_rows, n_per_row // block_size * type_size), dtype=np.uint8)
    if out.size:
        written = lib.ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, imatrix)
        if written != out.size:
            raise QpsaError(f"ggml_quantize_chunk wrote {written} bytes for {qtype.name}, expected {out.size}")
    return out.reshape(*values.shape[:-1], out.shape[1])
