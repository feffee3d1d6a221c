"""The tokenizer a GGUF file describes, giving the same ids as llama.cpp.

`vocab.read_vocab` reads the vocabulary as llama.cpp does (tokens, scores, types, merges, special
ids and flags from `tokenizer.ggml.*`, never from token names a builder expects). Encoding a text
then follows llama.cpp's `llama_vocab::impl::tokenize` with `parse_special = false`, the way
llama-perplexity tokenizes its text:

1. USER_DEFINED tokens are cut out of the text, longest first, each at every place it occurs
   (`tokenizer_st_partition`); CONTROL and UNKNOWN tokens are not: `<bos>` or `<|im_start|>` in
   a text is plain text.
2. Each remaining piece goes through the model's own algorithm:
   * SPM (`llama`): a space first where add_space_prefix is set (before every piece, as llama.cpp
     does after a cut-out token), spaces become `▁`, then adjacent symbols merge, the pair whose
     union is the token with the highest score first (ties: leftmost), and characters that end up
     outside the vocabulary become their UTF-8 bytes' `<0xNN>` tokens.
   * BPE (`gpt2`): the pre-tokenizer regexes of `tokenizer.ggml.pre` cut the piece into words,
     each word's bytes are mapped to GPT-2's byte alphabet and merged by the file's merge ranks
     (llama-bpe: a word that is a token stays whole).
3. BOS (and EOS) only where asked: `encode(text, bos=tok.add_bos)` is llama.cpp's add_special.

Step 2 runs in the `tokenizers` library (a BPE model whose merges are the SPM scores' order, or
the file's merges; a Split pre-tokenizer per regex) wherever that is provably the same algorithm:
every merge llama.cpp can make is a merge of two tokens into a token, and merges of equal score
never compete. Otherwise (tokens made from characters that are not tokens, merges that make
non-tokens, equal-score merges that can overlap — Gemma 3's vocabulary has those) a pure-Python
copy of llama.cpp's algorithm runs instead, word by word with a memo: the same ids, slower. The
built engine is cached as JSON under the q-psa cache, keyed by the file's sha256 and
`_CACHE_VERSION`.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
from dataclasses import dataclass, field

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

from qpsa.errors import QpsaError
from qpsa.fsutil import cache_root, write_atomic
from qpsa.model.vocab import BYTE, C_SPACE, CONTROL, LSTRIP, NORMAL, RSTRIP, UNKNOWN, USER_DEFINED, Vocab, read_vocab

log = logging.getLogger(__name__)

_CACHE_VERSION = 2  # bump when a cached engine would tokenize differently from a fresh build


def _gpt2_bytes() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_OF_CHAR = {c: b for b, c in _gpt2_bytes().items()}


@dataclass
class Tokenizer:
    vocab: Vocab
    backend: FastTokenizer  # the model's algorithm on plain-text pieces (see the module docstring)
    exact_backend: bool  # False: the pure-Python copy of llama.cpp's algorithm runs instead of backend
    _matched: list[int] = field(init=False, repr=False)
    _pieces: list[bytes] | None = field(default=None, init=False, repr=False)
    _ranks: dict[tuple[str, str], int] | None = field(default=None, init=False, repr=False)
    _spm_cuts: re.Pattern | None = field(default=None, init=False, repr=False)
    _memo: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False)  # word -> ids

    def __post_init__(self):
        self._matched = self.vocab.matched_in_text()

    @property
    def vocab_size(self) -> int:
        return len(self.vocab.tokens)

    @property
    def bos_id(self) -> int | None:
        return self.vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.vocab.eos_id

    @property
    def add_bos(self) -> bool:  # whether llama.cpp adds BOS at the start of a text for this vocabulary
        return self.vocab.add_bos and self.vocab.bos_id is not None

    @property
    def add_eos(self) -> bool:  # whether llama.cpp adds EOS at the end of a text for this vocabulary
        return self.vocab.add_eos and self.vocab.eos_id is not None

    def token(self, i: int) -> str:
        return self.vocab.tokens[i]

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled `text`, or None."""
        return self.vocab.ids.get(text)

    # -- encoding ---------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` as plain text, with BOS first / EOS last where asked (and defined)."""
        pieces = self._partition(text)
        texts = [p for p in pieces if isinstance(p, str)]
        if self.exact_backend and len(texts) == 1:
            encoded = iter([self.backend.encode(texts[0], add_special_tokens=False).ids])
        elif self.exact_backend:
            encoded = iter(e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False))
        else:
            encoded = iter(map(self._encode_python, texts))
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        for p in pieces:
            if isinstance(p, str):
                ids.extend(next(encoded))
            else:
                ids.append(p)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _partition(self, text: str) -> list[str | int]:
        """`text` cut around its user-defined tokens (llama.cpp's tokenizer_st_partition)."""
        pieces: list[str | int] = [text] if text else []
        for tid in self._matched:
            tok = self.vocab.tokens[tid]
            if tok not in text:
                continue
            attr = self.vocab.attrs[tid]
            out: list[str | int] = []
            for p in pieces:
                if isinstance(p, int) or tok not in p:
                    out.append(p)
                    continue
                start, end = 0, len(p)
                while True:
                    at = p.find(tok, start, end)
                    if at < 0:
                        if start < end:
                            out.append(p[start:end])
                        break
                    left = p[start:at]
                    if attr & LSTRIP:
                        left = left.rstrip(C_SPACE)
                    if left:
                        out.append(left)
                    out.append(tid)
                    start = at + len(tok)
                    if attr & RSTRIP:
                        while start < end and p[start] in C_SPACE:
                            start += 1
                    if start >= end:
                        break
            pieces = out
        return pieces

    def _encode_python(self, text: str) -> list[int]:
        if self.vocab.spm:
            if self.vocab.add_space_prefix:
                text = " " + text
            words = self._spm_words().split(text.replace(" ", "▁"))
            merge = self._spm_merge
        else:
            words = [w for w, _ in self.backend.pre_tokenizer.pre_tokenize_str(text)]
            merge = self._bpe_merge
        memo = self._memo
        if len(memo) > 500_000:  # a bound on the memory it keeps
            memo.clear()
        out = []
        for w in words:
            if (ids := memo.get(w)) is None:
                ids = memo[w] = merge(w)
            out.extend(ids)
        return out

    def _spm_words(self) -> re.Pattern:
        """Where llama.cpp's SPM merges can never cross: before a `▁` that follows a character c
        such that no token holds "c▁" (each side then merges alone, in the same order)."""
        if self._spm_cuts is None:
            joined = {t[i - 1] for t in self.vocab.tokens for i in range(1, len(t)) if t[i] == "▁"}
            self._spm_cuts = re.compile(f"(?<=[^{re.escape(''.join(sorted(joined | {'▁'})))}])(?=▁)")
        return self._spm_cuts

    def _spm_merge(self, text: str) -> list[int]:
        """llama.cpp's llm_tokenizer_spm_session::tokenize."""
        ids, scores = self.vocab.ids, self.vocab.scores
        sym = list(text)  # each symbol's text, "" once merged into its left neighbour
        n = len(sym)
        prev, nxt = list(range(-1, n - 1)), [*range(1, n), -1]
        queue: list[tuple[float, int, int, int]] = []

        def push(left, right):
            if left >= 0 and right >= 0 and (tid := ids.get(sym[left] + sym[right])) is not None:
                heapq.heappush(queue, (-scores[tid], left, right, len(sym[left]) + len(sym[right])))

        for i in range(1, n):
            push(i - 1, i)
        while queue:
            _, left, right, size = heapq.heappop(queue)
            if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
                continue  # outdated
            sym[left] += sym[right]
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        out = []
        i = 0 if n else -1
        while i != -1:
            tid = ids.get(sym[i])
            out.extend([tid] if tid is not None else map(self._byte_token, sym[i].encode()))
            i = nxt[i]
        return out

    def _byte_token(self, b: int) -> int:
        tid = self.vocab.ids.get(f"<0x{b:02X}>", self.vocab.ids.get(chr(b)) if b < 128 else None)
        if tid is None:
            raise QpsaError(f"the vocabulary has no byte token <0x{b:02X}> for a character outside it")
        return tid

    def _bpe_merge(self, word: str) -> list[int]:
        """llama.cpp's llm_tokenizer_bpe_session::tokenize for one word (in GPT-2's byte alphabet)."""
        ids = self.vocab.ids
        if self.vocab.pre_tokenizer.ignore_merges and word in ids:
            return [ids[word]]
        if self._ranks is None:
            self._ranks = {pair: r for r, pair in enumerate(self.vocab.merges)}
        ranks = self._ranks
        sym = list(word)
        n = len(sym)
        prev, nxt = list(range(-1, n - 1)), [*range(1, n), -1]
        queue: list[tuple[int, int, int, str]] = []

        def push(left, right):
            if left >= 0 and right >= 0 and (rank := ranks.get((sym[left], sym[right]))) is not None:
                heapq.heappush(queue, (rank, left, right, sym[left] + sym[right]))

        for i in range(1, n):
            push(i - 1, i)
        while queue:
            _, left, right, text = heapq.heappop(queue)
            if not sym[left] or not sym[right] or sym[left] + sym[right] != text:
                continue  # outdated
            sym[left] = text
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        out = []
        for s in sym:
            if not s:
                continue
            if (tid := ids.get(s)) is not None:
                out.append(tid)
            else:  # llama.cpp looks each byte of a non-token up as a one-byte token text
                out.extend(ids[chr(b)] for b in s.encode() if b < 128 and chr(b) in ids)
        return out

    # -- decoding ---------------------------------------------------------------------------------

    def decode(self, ids) -> str:
        """The text of `ids` as llama.cpp's detokenize renders it (control tokens shown)."""
        if self._pieces is None:
            self._pieces = [self._piece(i) for i in range(self.vocab_size)]
        ids = list(ids)
        raw = b"".join(self._pieces[i] for i in ids)
        if self.vocab.spm and self.vocab.add_space_prefix and ids and self._pieces[ids[0]].startswith(b" "):
            raw = raw[1:]
        return raw.decode("utf-8", errors="replace")

    def _piece(self, i: int) -> bytes:
        text, attr = self.vocab.tokens[i], self.vocab.attrs[i]
        if attr & (UNKNOWN | CONTROL | USER_DEFINED):
            return text.encode()
        if attr & NORMAL:
            if self.vocab.spm:
                return text.replace("▁", " ").encode()
            return bytes(_BYTE_OF_CHAR[c] for c in text) if all(c in _BYTE_OF_CHAR for c in text) else text.encode()
        if attr & BYTE:
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                return bytes([int(text[3:5], 16)])
            return bytes(_BYTE_OF_CHAR[c] for c in text if c in _BYTE_OF_CHAR)
        return b""  # unused and undefined tokens render as nothing


# -- building ---------------------------------------------------------------------------------------


def load_tokenizer(metadata: dict, sha256: str) -> Tokenizer:
    """The tokenizer of a GGUF file (its engine from the cache when this file was seen before)."""
    vocab = read_vocab(metadata)
    cached = cache_root() / "tokenizers" / f"{sha256}-v{_CACHE_VERSION}.json"
    entry = None
    if cached.exists():
        try:
            stored = json.loads(cached.read_text())
            entry = FastTokenizer.from_str(stored["backend"]), bool(stored["exact"])
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            log.warning("rebuilding damaged tokenizer cache %s", cached)
    if entry is None:
        entry = build_backend(vocab)
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, json.dumps({"version": _CACHE_VERSION, "exact": entry[1], "backend": entry[0].to_str()}))
    backend, exact = entry
    if not exact:
        log.info("tokenizing with the Python copy of llama.cpp's algorithm (%s)", cached.name)
    return Tokenizer(vocab, backend, exact)


def build_backend(vocab: Vocab) -> tuple[FastTokenizer, bool]:
    """(the `tokenizers` engine of the vocabulary, whether it gives llama.cpp's ids exactly)."""
    token_ids = vocab.ids
    if vocab.spm:
        merges, exact = _spm_merges(vocab)
        # (where the Python copy runs, the backend only looks tokens up: no merges to store and load)
        model = models.BPE(vocab=dict(token_ids), merges=merges if exact else [], byte_fallback=True)
        backend = FastTokenizer(model)
        steps = [normalizers.Prepend("▁")] if vocab.add_space_prefix else []
        backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        return backend, exact
    # byte-level BPE: a merge tokenizers can hold joins two tokens into a token
    usable = [(a, b) for a, b in vocab.merges if a in token_ids and b in token_ids and a + b in token_ids]
    exact = len(usable) == sum(1 for a, b in vocab.merges if a and b)
    pre = vocab.pre_tokenizer
    model = models.BPE(vocab=dict(token_ids), merges=usable, ignore_merges=pre.ignore_merges)
    backend = FastTokenizer(model)
    try:
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
    except Exception as e:  # pragma: no cover - every table regex compiles
        raise QpsaError(f"pre-tokenizer {vocab.pre!r}: {e}") from None
    backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                       use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, exact


def _spm_merges(vocab: Vocab) -> tuple[list[tuple[str, str]], bool]:
    """Merges that make llama.cpp's SPM algorithm a BPE: every split of a token into two tokens,
    ranked by the token's score (highest first; equal scores by token id, then split point).
    Tokens that never occur inside a piece get none: those with a space (the pieces have `▁`
    instead) and user-defined tokens without `▁` (cut out of the text before). Not exact when a
    token can also be made from a character that is not a token, or where ties matter."""
    ids, scores = vocab.ids, vocab.scores
    cut_out = set(vocab.matched_in_text())
    ranked = []
    exact = True
    for text, tid in ids.items():
        if " " in text or (tid in cut_out and "▁" not in text):
            continue  # never inside a piece, so no merge makes it
        for cut in range(1, len(text)):
            a, b = text[:cut], text[cut:]
            in_a, in_b = a in ids, b in ids
            if in_a and in_b:
                ranked.append((-scores[tid], tid, cut, a, b))
            elif (in_a or len(a) == 1) and (in_b or len(b) == 1):
                exact = False  # llama.cpp can merge through a character outside the vocabulary
    ranked.sort(key=lambda m: m[:3])
    return [(a, b) for *_, a, b in ranked], exact and _ties_are_harmless(ranked, ids)


def _ties_are_harmless(ranked, ids) -> bool:
    """Whether ranking merges of equal score statically gives llama.cpp's order. llama.cpp takes
    merges of equal score leftmost first; the static ranks agree with that unless two different
    merges of one score can touch ([a][b][c]: a+b and b+c), or a merge's result can take part in
    a merge of at least its score (then which one went first decides what follows)."""
    best_use: dict[str, float] = {}  # a token -> the highest score of a merge it is a part of
    groups: dict[float, set[tuple[str, str]]] = {}
    for neg_score, _, _, a, b in ranked:
        for part in (a, b):
            best_use[part] = max(best_use.get(part, -neg_score), -neg_score)
        groups.setdefault(neg_score, set()).add((a, b))
    for neg_score, pairs in groups.items():
        if len(pairs) < 2:
            continue
        lefts: dict[str, set[tuple[str, str]]] = {}
        for pair in pairs:
            lefts.setdefault(pair[0], set()).add(pair)
        for pair in pairs:
            if lefts.get(pair[1], set()) - {pair} or best_use.get(pair[0] + pair[1], -float("inf")) >= -neg_score:
                return False
    return True
