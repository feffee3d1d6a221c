"""Downloads from the Hugging Face Hub: GGUF models and the WikiText-2 test text.

Everything goes through ``huggingface_hub.hf_hub_download``: its cache, its progress bar, its retries (a transfer that
breaks is resumed with an HTTP Range request within the same call, from the last whole 10 MiB piece written; a killed
process starts over next time) and its own handling of ``HF_ENDPOINT`` (a mirror), ``HF_HUB_OFFLINE``,
``HF_HOME``/``HF_HUB_CACHE`` and ``HF_TOKEN``. Failures reach the user as one-line :class:`QpsaError`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from qpsa.errors import QpsaError
from qpsa.fsutil import cache_root, write_atomic

GGUF_MAGIC = b"GGUF"
# The zip llama.cpp's scripts/get-wikitext-2.sh fetches.
WIKITEXT_REPO = "ggml-org/ci"
WIKITEXT_ZIP = "wikitext-2-raw-v1.zip"
WIKITEXT_MEMBER = "wikitext-2-raw/wiki.test.raw"


def download_gguf(repo_id: str, filename: str, *, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """Fetch a GGUF from the Hub with huggingface_hub.hf_hub_download (its progress bar, its cache, its resume of a
    broken transfer); returns the local path. ``cache_dir`` is the Hugging Face cache (default ``$HF_HUB_CACHE``)."""
    path = _fetch(repo_id, filename, revision=revision, cache_dir=cache_dir)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise QpsaError(f"{repo_id}/{filename} is not a GGUF file (starts with {head!r}, not {GGUF_MAGIC!r}): {path}")
    return path


def wikitext2_test_text(cache_dir: Path | None = None) -> Path:
    """The WikiText-2 raw test split, ``wiki.test.raw``, extracted once into the q-psa cache (``cache_dir``, default
    :func:`cache_root`) from ``wikitext-2-raw-v1.zip`` in the Hub dataset repo ``ggml-org/ci``. Later calls use the
    extracted file without touching the network."""
    dest = Path(cache_dir if cache_dir is not None else cache_root()) / WIKITEXT_MEMBER
    if dest.is_file():
        return dest
    zpath = _fetch(WIKITEXT_REPO, WIKITEXT_ZIP, repo_type="dataset")
    what = f"datasets/{WIKITEXT_REPO}/{WIKITEXT_ZIP} ({zpath})"
    try:
        with zipfile.ZipFile(zpath) as zf:
            if WIKITEXT_MEMBER not in zf.namelist():
                raise QpsaError(f"{what} has no member {WIKITEXT_MEMBER}")
            with zf.open(WIKITEXT_MEMBER) as src:
                dest.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(dest, src.read())
    except zipfile.BadZipFile as e:
        raise QpsaError(f"{what} is not a valid zip file: {e}") from None
    return dest


def _fetch(
    repo_id: str, filename: str, *, repo_type: str | None = None, revision: str | None = None, cache_dir=None
) -> Path:
    """hf_hub_download, with its exceptions turned into one-line QpsaErrors."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:  # the HTTP client's transport errors (network down mid-transfer, after huggingface_hub's own retries)
        from httpx2 import TransportError  # huggingface_hub >= 2
    except ImportError:
        try:
            from httpx import TransportError  # huggingface_hub 1.x
        except ImportError:
            TransportError = OSError  # huggingface_hub 0.x: requests' errors are OSErrors

    kind = "dataset" if repo_type == "dataset" else "model"
    what = f"{'datasets/' if kind == 'dataset' else ''}{repo_id}/{filename}"
    at = f"@{revision}" if revision else ""
    endpoint = constants.ENDPOINT
    try:
        path = hf_hub_download(
            repo_id, filename, repo_type=repo_type, revision=revision, cache_dir=cache_dir, library_name="q-psa"
        )
    # LocalEntryNotFoundError subclasses EntryNotFoundError (in every huggingface_hub version): test it first.
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if getattr(constants, "HF_HUB_OFFLINE", False):
            raise QpsaError(
                f"{what}{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: unset it to download"
            ) from None
        raise QpsaError(
            f"cannot reach the Hugging Face Hub at {endpoint} (network unreachable or offline) to download {what}{at},"
            " and it is not in the local cache: check the connection, HF_ENDPOINT and HF_HUB_OFFLINE"
        ) from None
    except RevisionNotFoundError:
        raise QpsaError(f"revision {revision!r} not found in Hugging Face {kind} repo {repo_id} ({endpoint})") from None
    except EntryNotFoundError:
        raise QpsaError(f"file {filename!r} not found in Hugging Face {kind} repo {repo_id}{at} ({endpoint})") from None
    except RepositoryNotFoundError:
        raise QpsaError(
            f"Hugging Face {kind} repo {repo_id!r} not found at {endpoint}"
            " (if it is private or gated: `hf auth login` or set HF_TOKEN)"
        ) from None
    except TransportError as e:
        raise QpsaError(
            f"network error while downloading {what}{at} from {endpoint}: {_one_line(e)}"
            " (check the connection and HF_ENDPOINT)"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise QpsaError(f"download of {what}{at} from {endpoint} failed: {_one_line(e)}") from None
    return Path(path)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
