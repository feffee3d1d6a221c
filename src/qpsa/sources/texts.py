"""Evaluation texts: a file, a named dataset, or the default prose that every Python installation carries.

Every text carries its name and the sha256 of its UTF-8 bytes, and every result prints both, so
numbers measured on different texts are never compared by mistake.

The default text is CPython's own reference documentation as shipped in the standard library
(`pydoc_data.topics`, the 79 topics of the Language Reference that `help()` shows: English prose
with code examples, about 465 kB on 3.11), joined in sorted topic order with blank lines. It needs
no network and nothing copied into this repository; it changes between Python versions, which its
sha256 reveals.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from qpsa.errors import QpsaError

DATASETS = ("wikitext-2",)


@dataclass(frozen=True)
class EvalText:
    name: str  # e.g. "wikitext-2-raw-test.txt" or "python-3.11.7-docs"
    text: str
    source: str  # where it came from (a path, or a description)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "chars": len(self.text)}


def default_text() -> EvalText:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    version = ".".join(map(str, sys.version_info[:3]))
    return EvalText(f"python-{version}-docs", text, f"pydoc_data.topics of CPython {version} (standard library)")


def text_from_file(path: str | Path) -> EvalText:
    """A UTF-8 text file. A leading BOM is dropped; NUL bytes and invalid UTF-8 are refused."""
    from qpsa.fsutil import read_bytes

    path = Path(path)
    data = read_bytes(path, "text file")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise QpsaError(f"{path}: contains a NUL byte at byte {nul}; not a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QpsaError(f"{path}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise QpsaError(f"{path}: the text is empty")
    return EvalText(path.name, text, str(path.resolve()))


def dataset_text(name: str) -> EvalText:
    if name == "wikitext-2":
        from qpsa.sources.hub import wikitext2_test_text

        path = wikitext2_test_text()
        return EvalText("wikitext-2-raw-test", text_from_file(path).text, f"Hub ggml-org/ci wikitext-2-raw-v1.zip ({path})")
    raise QpsaError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def resolve_text(text_file: str | None = None, dataset: str | None = None) -> EvalText:
    if text_file and dataset:
        raise QpsaError("give either --text or --dataset, not both")
    if text_file:
        return text_from_file(text_file)
    if dataset:
        return dataset_text(dataset)
    return default_text()
