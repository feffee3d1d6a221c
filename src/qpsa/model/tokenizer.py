"""The tokenizer a GGUF file describes, giving the same ids as llama.cpp.

The file stores the vocabulary, scores, token types and merges as metadata. The first load hands
them to transformers' GGUF tokenizer builder (sentencepiece-style for `llama`, byte-level BPE for
`gpt2` with the file's pre-tokenizer), and the resulting fast tokenizer is cached as JSON under
the q-psa cache, keyed by the file's sha256; later loads read only that JSON.

Text is always tokenized as plain text: strings that look like control tokens (`<bos>`,
`<|im_start|>`) in the input are split like any other characters, as llama.cpp does when it
tokenizes a perplexity text (`parse_special = false`). BOS is added only where asked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

from qpsa.errors import QpsaError
from qpsa.fsutil import cache_root, write_atomic

log = logging.getLogger(__name__)

# GGUF key (after "tokenizer.ggml.") -> transformers' name for it
_GGUF_TOKENIZER_KEYS = {
    "model": "tokenizer_type",
    "pre": "pre_tokenizer_type",
    "tokens": "tokens",
    "scores": "scores",
    "token_type": "token_type",
    "merges": "merges",
    "precompiled_charsmap": "precompiled_charsmap",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id",
    "add_space_prefix": "add_prefix_space",
}


# Byte-level BPE pre-tokenizers that llama.cpp applies (one regex after another, each splitting the
# pieces of the last) and that transformers' builder does not know. From llama.cpp's llama-vocab.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_EXTRA_PRE_TOKENIZERS = {
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    (r"\p{N}", _GPT2_SPLIT)),
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais"), (_GPT2_SPLIT,)),
}


@dataclass
class Tokenizer:
    backend: FastTokenizer
    bos_id: int | None
    eos_id: int | None
    add_bos: bool  # whether llama.cpp adds BOS at the start of a text for this vocabulary

    def __post_init__(self):
        self.backend.encode_special_tokens = True  # control-token look-alikes are plain text

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token(self, i: int) -> str:
        return self.backend.id_to_token(i)


def load_tokenizer(metadata: dict, sha256: str) -> Tokenizer:
    """The tokenizer of a GGUF file (from the cache when this file was seen before)."""
    cached = cache_root() / "tokenizers" / f"{sha256}.json"
    if cached.exists():
        try:
            backend = FastTokenizer.from_file(str(cached))
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            log.warning("rebuilding damaged tokenizer cache %s", cached)
            backend = None
    else:
        backend = None
    if backend is None:
        backend = _build(metadata)
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, backend.to_str())
    model = metadata.get("tokenizer.ggml.model")
    # llama.cpp adds BOS by default to sentencepiece vocabularies, and where the file says so
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama"))
    return Tokenizer(
        backend=backend,
        bos_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
        add_bos=add_bos,
    )


def _build(metadata: dict) -> FastTokenizer:
    if "tokenizer.ggml.tokens" not in metadata:
        raise QpsaError("the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise QpsaError(f"building a tokenizer from GGUF needs transformers>=5.20 ({e})") from None
    tokenizer_dict = {
        name: metadata[f"tokenizer.ggml.{key}"]
        for key, name in _GGUF_TOKENIZER_KEYS.items()
        if f"tokenizer.ggml.{key}" in metadata
    }
    try:
        backend, _ = convert_gguf_tokenizer(metadata.get("general.architecture"), tokenizer_dict)
    except QpsaError:
        raise
    except Exception as e:
        raise QpsaError(
            f"cannot build the tokenizer (model {tokenizer_dict.get('tokenizer_type')!r}, "
            f"pre {tokenizer_dict.get('pre_tokenizer_type')!r}): {e}"
        ) from None
    splits = _EXTRA_PRE_TOKENIZERS.get(tokenizer_dict.get("pre_tokenizer_type"))
    if splits and tokenizer_dict.get("tokenizer_type") == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    return backend
