"""The requantized-blocks cache: a hit is the bytes a fresh quantization gives; another imatrix, another
type or a changed file misses; entries beyond the budget go, least recently used first; 0 turns it off."""

from __future__ import annotations

import os

import numpy as np
from gguf import GGMLQuantizationType as Q
from helpers.tiny import write_wide_gguf

from qpsa.gguf.read import open_gguf
from qpsa.quant.imatrix import Imatrix
from qpsa.quant.requantize import RequantizedCache, quantized_raw

NAME = "blk.0.ffn_up.weight"


def _imatrix(gguf_file, scale: float) -> Imatrix:
    n = gguf_file.tensors[NAME].shape[-1]
    return Imatrix({NAME: np.full((1, n), scale, dtype=np.float32) + np.arange(n, dtype=np.float32)[None]},
                   {NAME: np.array([4])}, ["test"], 1, 32)


def test_a_hit_is_a_fresh_quantization_and_only_the_same_key_hits(tmp_path):
    gguf_file = open_gguf(write_wide_gguf(tmp_path / "m.gguf"))
    values = gguf_file.tensors[NAME].to_torch().numpy()
    cache = RequantizedCache(1 << 30)
    a = cache.raw(gguf_file, NAME, Q.Q4_K)
    assert np.array_equal(a, quantized_raw(NAME, values, Q.Q4_K)) and not a.flags.writeable
    assert cache.raw(gguf_file, NAME, Q.Q4_K) is a and (cache.hits, cache.misses) == (1, 1)
    im1, im2 = _imatrix(gguf_file, 1.0), _imatrix(gguf_file, 50.0)
    b = cache.raw(gguf_file, NAME, Q.Q4_K, im1)
    assert np.array_equal(b, quantized_raw(NAME, values, Q.Q4_K, im1)) and not np.array_equal(a, b)
    assert cache.raw(gguf_file, NAME, Q.Q4_K, _imatrix(gguf_file, 1.0)) is b  # the same weights by content
    c = cache.raw(gguf_file, NAME, Q.Q4_K, im2)
    assert np.array_equal(c, quantized_raw(NAME, values, Q.Q4_K, im2)) and cache.misses == 3
    cache.raw(gguf_file, NAME, Q.Q5_K)
    assert cache.misses == 4
    os.utime(gguf_file.path, ns=(1, 1))  # the file changed (as far as its stat says): no stale hit
    cache.raw(gguf_file, NAME, Q.Q4_K)
    assert cache.misses == 5


def test_the_budget_evicts_the_least_recently_used_and_zero_turns_it_off(tmp_path):
    gguf_file = open_gguf(write_wide_gguf(tmp_path / "m.gguf"))
    one = quantized_raw(NAME, gguf_file.tensors[NAME].to_torch().numpy(), Q.Q8_0).nbytes
    cache = RequantizedCache(2 * one)
    cache.raw(gguf_file, NAME, Q.Q8_0)
    cache.raw(gguf_file, "blk.1.ffn_up.weight", Q.Q8_0)
    cache.raw(gguf_file, NAME, Q.Q8_0)  # used again: now the most recent
    cache.raw(gguf_file, "blk.2.ffn_up.weight", Q.Q8_0)  # over budget: blk.1 goes
    assert cache.n_bytes <= 2 * one and len(cache.entries) == 2
    kept = {key[3] for key in cache.entries}
    assert kept == {NAME, "blk.2.ffn_up.weight"}
    off = RequantizedCache(0)
    off.raw(gguf_file, NAME, Q.Q8_0)
    assert not off.entries and off.misses == 0


def test_a_bad_cache_size_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    from helpers.cli_run import assert_user_error
    from helpers.cli_run import run as cli
    from helpers.tiny import PROSE

    from qpsa.quant import requantize

    path = write_wide_gguf(tmp_path / "m.gguf")
    text = tmp_path / "t.txt"
    text.write_text(PROSE)
    monkeypatch.setattr(requantize.REQUANTIZED, "_max_bytes", None)  # read the variable again
    monkeypatch.setenv("QPSA_REQUANT_CACHE_MB", "lots")
    code, _, err = cli(capsys, "sensitivity", path, "--to", "q8_0", "--text", text, "--ctx", 32, "--chunks", 1,
                       "--out", tmp_path / "s", "--json")
    assert_user_error(code, err, "QPSA_REQUANT_CACHE_MB", "'lots'")
