"""Deterministic train / val / test split of a corpus, by document.

Each document's key (its relative path, or a row's text) is hashed with blake2b to a number u in [0, 1):
``u < f`` goes to val, ``f <= u < 2f`` to test, the rest to train (f = ``val_fraction``). A document's
split depends on nothing but its own key, so adding files to a folder never moves the others.

Guarantees: val, test and train each get at least one document. When a bucket comes out empty
(small corpora), the document nearest to it in u is moved over from the fullest bucket.

A corpus of one or two documents (a single ``input.txt`` is common) is split by position instead:
each document's first ``1 - 2f`` goes to train, the next ``f`` to val and the last ``f`` to test,
each cut moved forward to the next line break so no line is split.
"""

from __future__ import annotations

import hashlib

from mtp_lightning.data.corpora import Document
from mtp_lightning.errors import UserError

SPLITS = ("train", "val", "test")


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) from a key; the same on every machine and Python version."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _by_hash(docs: list[Document], fraction: float) -> dict[str, list[int]]:
    u = [unit_hash(d.key) for d in docs]
    buckets: dict[str, list[int]] = {name: [] for name in SPLITS}
    for i, ui in enumerate(u):
        buckets["val" if ui < fraction else "test" if ui < 2 * fraction else "train"].append(i)
    ranges = {"val": (0.0, fraction), "test": (fraction, 2 * fraction), "train": (2 * fraction, 1.0)}
    for name in ("val", "test", "train"):
        if buckets[name]:
            continue
        # take from the fullest bucket (>= 2 documents when N >= 3) the document closest in u
        donor = max((b for b in SPLITS if b != name), key=lambda b: (len(buckets[b]), b == "train"))
        lo, hi = ranges[name]
        moved = min(buckets[donor], key=lambda i: (max(lo - u[i], u[i] - hi, 0.0), docs[i].key))
        buckets[donor].remove(moved)
        buckets[name].append(moved)
    return {name: sorted(idx) for name, idx in buckets.items()}


def _cut(text: str, at: int) -> int:
    """The first line start at or after ``at`` (or ``at`` itself when no line break follows)."""
    newline = text.find("\n", at)
    return newline + 1 if newline != -1 else at


def _by_position(docs: list[Document], fraction: float) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    for doc in docs:
        n = len(doc.text)
        a0, b0 = max(0, int(n * (1 - 2 * fraction))), int(n * (1 - fraction))
        a = _cut(doc.text, a0)
        b = _cut(doc.text, max(a, b0))
        if not (0 < a < b < n):  # too few lines to cut on line breaks: cut on characters instead
            a, b = a0, b0
        pieces = {"train": doc.text[:a], "val": doc.text[a:b], "test": doc.text[b:]}
        for name, piece in pieces.items():
            if piece.strip():
                out[name].append(piece)
    for name, texts in out.items():
        if not texts:
            total = sum(len(d.text) for d in docs)
            raise UserError(f"the corpus is too small to split ({len(docs)} document(s), {total} "
                            f"characters, no text left for {name}); give more text or raise "
                            f"data.val_fraction={fraction}")
    return out


def split_documents(docs: list[Document], val_fraction: float) -> dict[str, list[str]]:
    """{"train": [...], "val": [...], "test": [...]} texts, each list in the corpus's order."""
    assert 0.0 < val_fraction < 1.0, val_fraction
    if len(docs) < 3:
        return _by_position(docs, val_fraction)
    buckets = _by_hash(docs, val_fraction)
    return {name: [docs[i].text for i in idx] for name, idx in buckets.items()}
