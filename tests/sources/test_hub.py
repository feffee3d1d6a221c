"""qpsa.sources.hub against a loopback stand-in for the Hugging Face Hub (tests/hub_server.py): real huggingface_hub code."""

from __future__ import annotations

import io
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from helpers.hub_server import FakeHub, use_endpoint
from huggingface_hub import constants

from qpsa.errors import QpsaError
from qpsa.sources import hub

REPO = "acme/tiny-GGUF"
GGUF_NAME = "tiny-Q4_K_M.gguf"
GGUF = b"GGUF" + random.Random(0).randbytes(200_000)
WIKI_TEXT = " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles ( 戦場のヴァルキュリア3 ) \n" * 40


def wiki_zip(member: str = hub.WIKITEXT_MEMBER, text: str = WIKI_TEXT) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("wikitext-2-raw/wiki.train.raw", "train text\n")
        zf.writestr(member, text)
    return buf.getvalue()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running FakeHub with a GGUF and the wikitext zip; HF_ENDPOINT, HF_HOME/HF_HUB_CACHE, QPSA_CACHE point at it."""
    files = {
        ("model", REPO, GGUF_NAME): GGUF,
        ("model", REPO, "README.md"): b"# not a gguf\n" * 100,
        ("dataset", hub.WIKITEXT_REPO, hub.WIKITEXT_ZIP): wiki_zip(),
    }
    with FakeHub(files) as server:
        use_endpoint(monkeypatch, tmp_path, server.url)
        yield server


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("QPSA_CACHE", str(tmp_path / "c"))
    assert hub.cache_root() == tmp_path / "c"
    monkeypatch.delenv("QPSA_CACHE")
    assert hub.cache_root() == Path.home() / ".cache" / "q-psa"


def test_download_gguf_bytes_identical_then_from_cache(fake_hub, tmp_path):
    path = hub.download_gguf(REPO, GGUF_NAME)
    assert path.read_bytes() == GGUF
    assert path.resolve().is_relative_to(tmp_path / "hf" / "hub")  # huggingface_hub's cache, as configured
    assert len(fake_hub.gets(GGUF_NAME)) == 1

    assert hub.download_gguf(REPO, GGUF_NAME) == path
    assert len(fake_hub.gets(GGUF_NAME)) == 1  # a HEAD to check the revision, no second GET

    # pinned to a commit, a cached file needs no request at all
    n = len(fake_hub.requests)
    assert hub.download_gguf(REPO, GGUF_NAME, revision=fake_hub.commit).read_bytes() == GGUF
    fake_hub.stop()
    assert hub.download_gguf(REPO, GGUF_NAME, revision=fake_hub.commit).read_bytes() == GGUF
    assert len(fake_hub.requests) == n


def test_interrupted_download_resumes_with_range(fake_hub):
    # huggingface_hub streams in DOWNLOAD_CHUNK_SIZE (10 MiB) pieces and writes only whole pieces, so a transfer that
    # breaks resumes (Range, within the same call) from the last whole piece: the file must span a few of them.
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    big = b"GGUF" + random.Random(1).randbytes(3 * chunk + 12_345)
    fake_hub.files[("model", REPO, "big.gguf")] = big
    fake_hub.drop_after["big.gguf"] = 2 * chunk + 5_000  # the first GET hangs up after that many body bytes

    path = hub.download_gguf(REPO, "big.gguf")

    assert path.read_bytes() == big
    gets = fake_hub.gets("big.gguf")
    assert [g.range for g in gets] == [None, f"bytes={2 * chunk}-"], gets
    assert [g.status for g in gets] == [200, 206]
    assert gets[0].body_bytes == 2 * chunk + 5_000
    assert sum(g.body_bytes for g in gets) < 1.5 * len(big)
    assert not [p for p in path.resolve().parent.iterdir() if p.name.endswith(".incomplete")]


def test_interrupted_small_download_completes(fake_hub):
    # below one chunk nothing was written yet, so the retry starts over: slower, still correct
    fake_hub.drop_after[GGUF_NAME] = len(GGUF) // 2
    assert hub.download_gguf(REPO, GGUF_NAME).read_bytes() == GGUF
    assert [g.body_bytes for g in fake_hub.gets(GGUF_NAME)] == [len(GGUF) // 2, len(GGUF)]


@pytest.mark.parametrize(
    ("repo", "filename", "needle"),
    [(REPO, "missing-Q8_0.gguf", "'missing-Q8_0.gguf' not found"), ("acme/nope", GGUF_NAME, "'acme/nope' not found")],
    ids=["file", "repo"],
)
def test_not_found_names_what(fake_hub, repo, filename, needle):
    with pytest.raises(QpsaError, match=needle) as e:
        hub.download_gguf(repo, filename)
    assert "\n" not in str(e.value)


def test_unknown_revision(fake_hub):
    with pytest.raises(QpsaError, match="revision 'v9' not found"):
        hub.download_gguf(REPO, GGUF_NAME, revision="v9")


def test_non_gguf_payload(fake_hub):
    with pytest.raises(QpsaError, match=r"README\.md is not a GGUF file .*b'# no'"):
        hub.download_gguf(REPO, "README.md")


def test_wikitext_extracted_once_then_offline(fake_hub, tmp_path):
    path = hub.wikitext2_test_text()
    assert path == tmp_path / "q-psa" / "wikitext-2-raw" / "wiki.test.raw"
    assert path.read_text(encoding="utf-8") == WIKI_TEXT
    assert [g.path for g in fake_hub.requests] == [f"/datasets/{hub.WIKITEXT_REPO}/resolve/main/{hub.WIKITEXT_ZIP}"] * 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["wiki.test.raw"]  # no temp file left behind

    fake_hub.stop()
    shutil.rmtree(tmp_path / "hf")  # not even the cached zip: the extracted text alone must do
    assert hub.wikitext2_test_text() == path
    assert path.read_text(encoding="utf-8") == WIKI_TEXT


def test_wikitext_explicit_cache_dir(fake_hub, tmp_path):
    path = hub.wikitext2_test_text(tmp_path / "elsewhere")
    assert path == tmp_path / "elsewhere" / "wikitext-2-raw" / "wiki.test.raw"
    assert path.read_text(encoding="utf-8") == WIKI_TEXT


def test_wikitext_zip_without_member(fake_hub, tmp_path):
    fake_hub.files[("dataset", hub.WIKITEXT_REPO, hub.WIKITEXT_ZIP)] = wiki_zip(member="wikitext-2-raw/other.raw")
    with pytest.raises(QpsaError, match="has no member wikitext-2-raw/wiki.test.raw"):
        hub.wikitext2_test_text()
    assert not (tmp_path / "q-psa" / hub.WIKITEXT_MEMBER).exists()


def test_wikitext_not_a_zip(fake_hub):
    fake_hub.files[("dataset", hub.WIKITEXT_REPO, hub.WIKITEXT_ZIP)] = b"<html>captive portal</html>"
    with pytest.raises(QpsaError, match="is not a valid zip file"):
        hub.wikitext2_test_text()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket is closed


def test_hub_unreachable(tmp_path, monkeypatch):
    use_endpoint(monkeypatch, tmp_path, _closed_port_url())
    # huggingface_hub retries a failed connection with backoff (1+2+4+8+8 s); skip the waiting, keep the retries.
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    with pytest.raises(QpsaError, match=r"cannot reach the Hugging Face Hub at http://127\.0\.0\.1:\d+ \(network") as e:
        hub.download_gguf(REPO, GGUF_NAME)
    assert "HF_ENDPOINT" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    assert sleeps  # the library did retry: our error is not a shortcut around it
    with pytest.raises(QpsaError, match="cannot reach the Hugging Face Hub"):
        hub.wikitext2_test_text()


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, which reads HF_ENDPOINT etc. from its environment at import."""
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


CHILD = """
import sys
from qpsa.sources.hub import download_gguf, wikitext2_test_text
from qpsa.errors import QpsaError
try:
    print(download_gguf({repo!r}, {name!r}))
    print(wikitext2_test_text())
except QpsaError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def test_end_to_end_in_fresh_process(fake_hub, tmp_path):
    env = dict(os.environ)  # as use_endpoint left it: HF_ENDPOINT=fake hub, caches in tmp_path
    r = _run(CHILD.format(repo=REPO, name=GGUF_NAME), env)
    assert r.returncode == 0, r.stderr
    gguf, wiki = map(Path, r.stdout.split())
    assert gguf.read_bytes() == GGUF and gguf.resolve().is_relative_to(tmp_path / "hf" / "hub")
    assert wiki == tmp_path / "q-psa" / hub.WIKITEXT_MEMBER and wiki.read_text(encoding="utf-8") == WIKI_TEXT
    assert [(r.method, r.path.rsplit("/", 1)[1]) for r in fake_hub.requests] == [
        ("HEAD", GGUF_NAME), ("GET", GGUF_NAME), ("HEAD", hub.WIKITEXT_ZIP), ("GET", hub.WIKITEXT_ZIP)
    ]

    # offline: the cached GGUF and the extracted text still work, an uncached file is a clear error
    env["HF_HUB_OFFLINE"] = "1"
    fake_hub.stop()
    r = _run(CHILD.format(repo=REPO, name=GGUF_NAME), env)
    assert r.returncode == 0, r.stderr
    assert list(map(Path, r.stdout.split())) == [gguf, wiki]
    r = _run(CHILD.format(repo=REPO, name="other.gguf"), env)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.endswith("not in the local Hugging Face cache and HF_HUB_OFFLINE is set: unset it to download"), last
