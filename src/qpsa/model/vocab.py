"""A GGUF file's vocabulary as llama.cpp reads it (`llama-vocab.cpp`, `llama_vocab::impl::load`).

Everything comes from the file's `tokenizer.ggml.*` metadata: the tokens (their ids are their
positions), scores, token types, merges, the special-token ids and the add_bos / add_eos /
add_space_prefix flags, with llama.cpp's defaults where a key is absent:

| `tokenizer.ggml.model` | llama.cpp type | bos, eos, unk (defaults) | add_bos | add_space_prefix |
|---|---|---|---|---|
| `llama` | SPM (sentencepiece) | 1, 2, 0 | yes | yes |
| `gpt2` | BPE (byte-level) | 11, 11, none | no (llama-bpe: yes) | no |

A token's type says how tokenization treats it (`TokenType`): CONTROL and UNKNOWN tokens are
never matched in plain text, USER_DEFINED tokens are cut out of the text before the model's own
algorithm runs, BYTE tokens (`<0x41>`) are the sentencepiece byte fallback. llama.cpp changes a
few types by the token's text (its own rules, copied here because they change the ids): end-of-
generation and fill-in-the-middle names such as `<|im_end|>`, `<|endoftext|>`, `[EOS]` become
CONTROL, gpt-oss's `<|channel|>`-style tokens become USER_DEFINED, and files named Phi-3 strip
the whitespace after their special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from qpsa.errors import QpsaError


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (gguf's TokenType, llama.cpp's LLAMA_TOKEN_TYPE_*)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# token attributes, a bit set as in llama.cpp (llama_token_attr)
UNDEFINED, UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 0, 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
LSTRIP, RSTRIP = 1 << 7, 1 << 8
_ATTR_OF_TYPE = {TokenType.UNKNOWN: UNKNOWN, TokenType.UNUSED: UNUSED, TokenType.NORMAL: NORMAL,
                 TokenType.CONTROL: CONTROL, TokenType.USER_DEFINED: USER_DEFINED, TokenType.BYTE: BYTE}

# -- pre-tokenizers (`tokenizer.ggml.pre`) of byte-level BPE vocabularies ---------------------------
# Each is a list of regexes applied one after another, each splitting the pieces the last left
# (a match and the text between matches both become pieces). From llama.cpp's llm_tokenizer_bpe.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_CJK = "[一-龥ࠀ-一가-\ud7ff]+"
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+"
           r"((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a token is that token, whatever the merges say
    add_bos: bool = False  # llama.cpp's default where tokenizer.ggml.add_bos_token is absent


_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer(_DEFAULT),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"),
                    _LLAMA3_PRE),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((_LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
                    PreTokenizer((_QWEN2,))),
    "qwen35": PreTokenizer((_QWEN35,)),
    "deepseek-coder": PreTokenizer(_DEEPSEEK_CODER),
    "falcon": PreTokenizer(_FALCON),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
                    PreTokenizer((r"\p{N}", _GPT2))),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"),
                    PreTokenizer((_GPT2,))),
}

# -- llama.cpp's rules by token text ------------------------------------------------------------------

# end-of-generation tokens: llama.cpp makes each CONTROL (so plain text never matches it)
_EOG_NAMES = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
}
# fill-in-the-middle tokens, made CONTROL when the file gives no id for their role
_FIM_NAMES = {
    "tokenizer.ggml.fim_pre_token_id": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                                        "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "tokenizer.ggml.fim_suf_token_id": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                                        "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "tokenizer.ggml.fim_mid_token_id": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                                        "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "tokenizer.ggml.fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "tokenizer.ggml.fim_rep_token_id": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "tokenizer.ggml.fim_sep_token_id": ("<|file_sep|>",),
}
_FIM_OLD_KEYS = {"tokenizer.ggml.fim_pre_token_id": "tokenizer.ggml.prefix_token_id",
                 "tokenizer.ggml.fim_suf_token_id": "tokenizer.ggml.suffix_token_id",
                 "tokenizer.ggml.fim_mid_token_id": "tokenizer.ggml.middle_token_id"}
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

# whitespace as C's isspace sees it (llama.cpp strips it byte by byte beside LSTRIP/RSTRIP tokens)
C_SPACE = " \t\n\v\f\r"

SUPPORTED_MODELS = ("llama", "gpt2")


@dataclass
class Vocab:
    """What llama.cpp's tokenizer uses of a file's metadata."""

    model: str  # "llama" (SPM) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre, "default" when absent
    tokens: list[str] = field(repr=False)  # by id, each text once; an empty token is llama.cpp's "[EMPTY_<id>]"
    scores: list[float] = field(repr=False)
    attrs: list[int] = field(repr=False)  # llama.cpp's token attributes (bit set), after its rules by text
    merges: list[tuple[str, str]] = field(repr=False)  # BPE merges, first occurrence of each pair, in rank order
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    eot_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    ids: dict[str, int] = field(default_factory=dict, repr=False)  # token text -> id

    @property
    def spm(self) -> bool:
        return self.model == "llama"

    @property
    def pre_tokenizer(self) -> PreTokenizer:
        return PRE_TOKENIZERS[self.pre]

    def matched_in_text(self) -> list[int]:
        """Ids of the tokens cut out of plain text before the model's algorithm (USER_DEFINED,
        not also CONTROL or UNKNOWN), longest text first as llama.cpp tries them."""
        found = [i for i, a in enumerate(self.attrs) if a & USER_DEFINED and not a & (CONTROL | UNKNOWN)]
        return sorted(found, key=lambda i: (-len(self.tokens[i].encode()), i))


def read_vocab(metadata: dict) -> Vocab:
    """The vocabulary of a GGUF file as llama.cpp reads it; QpsaError for one it does not support."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in metadata:
        raise QpsaError("the GGUF file has no tokenizer (tokenizer.ggml.model or tokenizer.ggml.tokens is missing)")
    if model not in SUPPORTED_MODELS:
        raise QpsaError(f"unsupported tokenizer model tokenizer.ggml.model = {model!r}; "
                        f"supported: {', '.join(SUPPORTED_MODELS)}")
    spm = model == "llama"
    pre = metadata.get("tokenizer.ggml.pre") or "default"
    if not spm and pre not in PRE_TOKENIZERS:
        raise QpsaError(f"unsupported pre-tokenizer tokenizer.ggml.pre = {pre!r} (byte-level BPE); "
                        f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")

    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(metadata["tokenizer.ggml.tokens"])]
    n = len(tokens)
    scores = [float(s) for s in metadata.get("tokenizer.ggml.scores", [0.0] * n)][:n]
    types = metadata.get("tokenizer.ggml.token_type")
    if len(scores) < n or (types is not None and len(types) < n):
        raise QpsaError(f"tokenizer.ggml.scores or token_type has fewer entries than the {n} tokens")
    attrs = [NORMAL] * n if types is None else [_ATTR_OF_TYPE.get(t, UNDEFINED) for t in types[:n]]
    ids = {t: i for i, t in enumerate(tokens)}
    if len(ids) < n:  # llama.cpp asserts that every text is one token
        twice = next(t for i, t in enumerate(tokens) if ids[t] != i)
        raise QpsaError(f"the vocabulary holds the token {twice!r} twice (llama.cpp refuses it too)")

    merges: list[tuple[str, str]] = []
    if not spm:
        if "tokenizer.ggml.merges" not in metadata:
            raise QpsaError("byte-level BPE vocabulary without tokenizer.ggml.merges")
        seen = set()
        for m in metadata["tokenizer.ggml.merges"]:
            cut = m.find(" ", 1)
            pair = (m[:cut], m[cut + 1:]) if cut >= 0 else ("", "")
            if pair not in seen:  # llama.cpp keeps a pair's first rank
                seen.add(pair)
                merges.append(pair)

    # special ids: llama.cpp's defaults for the model, then the file's keys (where within the vocabulary)
    special = {"bos": 1, "eos": 2, "unk": 0} if spm else {"bos": 11, "eos": 11, "unk": None}
    special = {k: (v if v is not None and v < n else None) for k, v in special.items()}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id")):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None and 0 <= int(value) < n:
            special[role] = int(value)
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    eot = int(eot) if eot is not None and 0 <= int(eot) < n else None

    # llama.cpp's rules by token text (see the module docstring)
    def make_control(i):
        attrs[i] |= CONTROL

    for name in _EOG_NAMES:
        if name in ids:
            make_control(ids[name])
    if eot is None:
        eot = next((ids[t] for t in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                                     "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
                                     "<end_of_utterance>") if t in ids), None)
    for key, names in _FIM_NAMES.items():
        given = metadata.get(key, metadata.get(_FIM_OLD_KEYS.get(key, ""), None))
        if given is None or not 0 <= int(given) < n:
            for name in names:
                if name in ids:
                    make_control(ids[name])
    for name in _ALWAYS_USER_DEFINED:
        if name in ids:
            attrs[ids[name]] = USER_DEFINED
    eog = {t for t in _EOG_NAMES if t in ids}
    if "<|end|>" in eog and (("<|return|>" in eog and "<|call|>" in eog) or
                             ({"<|call|>", "<|calls|>"} & eog and "<|flush|>" in eog)):
        attrs[ids["<|end|>"]] = USER_DEFINED  # gpt-oss, solar-open: "<|end|>" is not the end
    if "</s>" in ids and ("<|tool_response>" in ids or
                          (special["eos"] is not None and tokens[special["eos"]] == "<|plamo:eos|>")):
        attrs[ids["</s>"]] = NORMAL
    name = str(metadata.get("general.name", "")).lower()
    if "phi-3" in name or "phi3" in name:
        for i, a in enumerate(attrs):
            if a & (CONTROL | USER_DEFINED | UNKNOWN):
                attrs[i] |= RSTRIP
        if "</s>" in ids:
            attrs[ids["</s>"]] |= RSTRIP
        for t in ("<unk>", "<s>", "<|endoftext|>"):
            if t in ids:
                attrs[ids[t]] &= ~RSTRIP
    elif "modern-bert" in name and "[MASK]" in ids:
        attrs[ids["[MASK]"]] |= LSTRIP

    def flag(key, default):
        value = metadata.get(f"tokenizer.ggml.{key}")
        return default if value is None else bool(value)

    return Vocab(
        model=model, pre=pre, tokens=tokens, scores=scores, attrs=attrs, merges=merges,
        bos_id=special["bos"], eos_id=special["eos"], unk_id=special["unk"], eot_id=eot,
        add_bos=flag("add_bos_token", spm or PRE_TOKENIZERS[pre].add_bos), add_eos=flag("add_eos_token", False),
        add_space_prefix=flag("add_space_prefix", spm), ids=ids,
    )
