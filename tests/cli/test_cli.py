"""The `q-psa` command as a user meets it: output, --json, and one clean line with exit 2 for bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from helpers.cli_run import assert_user_error, run
from helpers.malformed import malformed_cases
from helpers.tiny import PROSE, write_tiny_gguf


@pytest.fixture
def tiny(tmp_path):
    return str(write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", n_layer=2))


def test_help_is_instant_and_lists_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("models", "inspect", "ppl", "download"):
        assert command in out


def test_models_json(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0
    names = {m["name"] for m in json.loads(out)}
    assert {"smollm2-135m", "gemma3-270m"} <= names


def test_inspect_tiny_json(capsys, tiny):
    code, out, _ = run(capsys, "inspect", tiny, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["architecture"] == "llama" and report["n_layer"] == 2
    assert len(report["sha256"]) == 64 and report["file_size"] == os.path.getsize(tiny)
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    q = next(t for t in report["tensors"] if t["name"] == "blk.0.attn_q.weight")
    assert q["type"] == "F32" and q["bits_per_weight"] == 32.0


def test_inspect_table_and_layer_filter(capsys, tiny):
    code, out, _ = run(capsys, "inspect", tiny, "--layer", 1)
    assert code == 0
    assert "blk.1.ffn_down.weight" in out and "blk.0.ffn_down.weight" not in out


def test_ppl_json_follows_protocol(capsys, tiny, prose):
    code, out, _ = run(capsys, "ppl", tiny, "--text", prose, "--ctx", 32, "--chunks", 3, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["n_windows"] == 3 and result["ctx"] == 32
    assert result["n_scored"] == 3 * (32 - 1 - 16)
    assert math.isfinite(result["ppl"]) and result["ppl_se"] > 0
    assert len(result["running"]) == 3 and result["running"][-1]["ppl"] == pytest.approx(result["ppl"])
    assert result["text"]["name"] == "prose.txt" and len(result["text"]["sha256"]) == 64


def test_ppl_names_its_engine_and_gives_the_same_ppl_without_the_kernels(capsys, tiny, prose, monkeypatch):
    args = ("ppl", tiny, "--text", prose, "--ctx", 32, "--chunks", 3, "--json")
    code, out, _ = run(capsys, *args)
    compiled = json.loads(out)
    assert code == 0 and compiled["engine"]["threads"] >= 1
    if shutil.which(os.environ.get("CC", "cc")):
        assert compiled["engine"]["cpu_kernels"] == "compiled"
    monkeypatch.setenv("QPSA_KERNEL", "0")
    code, out, _ = run(capsys, *args)
    plain = json.loads(out)
    assert code == 0 and plain["engine"]["cpu_kernels"] == "torch ops"
    assert plain["ppl"] == pytest.approx(compiled["ppl"], rel=1e-5)
    code, out, _ = run(capsys, *args[:-1])
    assert "CPU kernels: torch ops" in " ".join(out.split())


def test_ppl_max_tokens_scores_every_token(capsys, tiny, prose):
    code, out, _ = run(capsys, "ppl", tiny, "--text", prose, "--max-tokens", 50, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["n_windows"] == 1 and result["n_scored"] == 49


def test_ppl_default_text_is_named(capsys, tiny):
    code, out, _ = run(capsys, "ppl", tiny, "--ctx", 64, "--chunks", 1, "--json")
    assert code == 0
    text = json.loads(out)["text"]
    assert text["name"].startswith("python-") and len(text["sha256"]) == 64


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--ctx", 0], "--ctx"),
        (["--ctx", -5], "--ctx"),
        (["--ctx", "abc"], "--ctx"),
        (["--ctx", "nan"], "--ctx"),
        (["--ctx", 10**9], "context length"),
        (["--ctx", 32, "--chunks", 0], "--chunks"),
        (["--ctx", 32, "--chunks", 10**6], "fewer than --chunks"),
        (["--max-tokens", 0], "--max-tokens"),
        (["--max-tokens", 10**7], "--max-tokens"),
    ],
)
def test_ppl_bad_numbers(capsys, tiny, prose, args, needle):
    code, _, err = run(capsys, "ppl", tiny, "--text", prose, *args)
    assert_user_error(code, err, needle)


def test_unknown_model_and_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "ppl", "no-such-model")
    assert_user_error(code, err, "no-such-model", "smollm2-135m")
    code, _, err = run(capsys, "inspect", tmp_path)
    assert_user_error(code, err, "directory")


def test_not_a_gguf(capsys, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model")
    code, _, err = run(capsys, "inspect", path)
    assert_user_error(code, err, "bad GGUF", "magic")


def test_unsupported_architecture(capsys, tmp_path, prose):
    path = write_tiny_gguf(tmp_path / "falcon.gguf", "falcon")
    code, _, err = run(capsys, "ppl", path, "--text", prose, "--ctx", 32)
    assert_user_error(code, err, "falcon", "llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


@pytest.mark.parametrize("case", malformed_cases(), ids=lambda c: c.name)
def test_every_malformed_file_is_one_clean_line(capsys, tmp_path, case):
    path = tmp_path / f"{case.name}.gguf"
    path.write_bytes(case.data)
    args = ["inspect", path] + (["--check-tensors"] if case.stage == "values" else [])
    code, _, err = run(capsys, *args)
    assert_user_error(code, err, str(path), case.field)


def test_nan_scale_refused_before_perplexity(capsys, tmp_path, prose):
    """A Q8_0 model with a NaN block scale is named, with tensor and block, before any evaluation."""
    from gguf import GGUFReader

    path = write_tiny_gguf(tmp_path / "q8.gguf", "llama", qtype=__import__("gguf").GGMLQuantizationType.Q8_0)
    t = next(t for t in GGUFReader(path).tensors if t.name == "blk.1.ffn_up.weight")
    data = bytearray(path.read_bytes())
    data[t.data_offset + 3 * 34 : t.data_offset + 3 * 34 + 2] = b"\x00\x7e"  # f16 NaN in block 3's scale
    path.write_bytes(bytes(data))
    code, _, err = run(capsys, "ppl", path, "--text", prose, "--ctx", 32)
    assert_user_error(code, err, "blk.1.ffn_up.weight", "block 3")
    code, out, err = run(capsys, "ppl", path, "--text", prose, "--ctx", 32, "--chunks", 1, "--no-check-tensors", "--json")
    assert code == 0 and math.isnan(json.loads(out)["ppl"])  # without the check the NaN reaches the result


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty"),
        (b"   \n\t\n", "empty"),
        (b"text with a NUL \x00 byte" * 10, "NUL"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "NUL"),
        (b"caf\xe9 au lait" * 10, "UTF-8"),
    ],
)
def test_bad_text_files(capsys, tiny, tmp_path, content, needle):
    path = tmp_path / "text.txt"
    path.write_bytes(content)
    code, _, err = run(capsys, "ppl", tiny, "--text", path, "--ctx", 32)
    assert_user_error(code, err, needle)


def test_text_too_short(capsys, tiny, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("just a few words")
    code, _, err = run(capsys, "ppl", tiny, "--text", path, "--ctx", 32)
    assert_user_error(code, err, "needs at least 64")


def test_bom_is_dropped_and_huge_single_line_works(capsys, tiny, tmp_path):
    with_bom, without = tmp_path / "bom.txt", tmp_path / "plain.txt"
    line = PROSE.replace("\n", " ") * 20  # one line of ~100 kB
    with_bom.write_bytes(b"\xef\xbb\xbf" + line.encode())
    without.write_bytes(line.encode())
    results = []
    for path in (with_bom, without):
        code, out, err = run(capsys, "ppl", tiny, "--text", path, "--ctx", 32, "--chunks", 2, "--json")
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0]["ppl"] == results[1]["ppl"]
    assert results[0]["text"]["sha256"] == results[1]["text"]["sha256"]


def test_special_token_lookalikes_in_text_are_plain_text(tiny):
    from qpsa.model.load import load_model

    tok = load_model(tiny).tokenizer
    ids = tok.encode("<|im_start|>user<|im_end|>")
    specials = {i for i in range(tok.vocab_size) if tok.token(i) in ("<|im_start|>", "<|im_end|>")}
    assert specials and not specials & set(ids)
    assert tok.decode(ids) == "<|im_start|>user<|im_end|>"


def test_malicious_chat_template_is_never_rendered(capsys, tmp_path, prose):
    """Metadata is data: a Jinja payload in tokenizer.chat_template must not run."""
    sentinel = tmp_path / "pwned"
    payload = "{{ cycler.__init__.__globals__.os.system('touch " + str(sentinel) + "') }}"
    path = write_tiny_gguf(tmp_path / "evil.gguf", "llama", **{"tokenizer.chat_template": payload})
    assert run(capsys, "inspect", path)[0] == 0
    assert run(capsys, "ppl", path, "--text", prose, "--ctx", 32, "--chunks", 1)[0] == 0
    assert not sentinel.exists()


def test_console_script_entry_point(tiny):
    """`python -m qpsa` runs the same CLI in a fresh process, with exit code 2 on bad input."""
    proc = subprocess.run([sys.executable, "-m", "qpsa", "inspect", tiny + ".missing"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr
