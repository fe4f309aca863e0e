"""The on-disk cache of trained tokenizers and tokenised splits.

Layout under ``data.cache_dir`` (default ``~/.cache/mtp_lightning``)::

    tokenizer-<key>.json        a BPE trained on a corpus's train split (key: corpus, vocab, train_bytes)
    tokenizer-<key>.json.manifest     its size and checksum
    corpus-<key>/               one tokenised corpus (key: corpus, split rule, tokenizer fingerprint)
        train.npy val.npy test.npy    flat token streams, each document followed by eot
        meta.json                     the manifest: each file's size and checksum, then the counts

Both are ``mtp_lightning.atomic.cached_entry``s: every file is written atomically, the manifest last,
and an entry is used only once its files match it; a truncated or altered one is rebuilt with a note.
Builds run under a file lock with a second check inside, so concurrent processes (DDP ranks, two runs)
build once and the others wait and then read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mtp_lightning.atomic import writing
from mtp_lightning.data.corpora import ByteBudget
from mtp_lightning.data.tokenizer import Tokenizer

FORMAT_VERSION = 2
"""Bump when the split rule, the document joining or the file layout changes: old entries are ignored.
2: ``meta.json`` became a manifest (sizes and checksums of the files)."""
_ENCODE_CHUNK = 256  # documents per encode_batch call: bounds the Python lists held at once


def cache_root(cache_dir: str) -> Path:
    default = os.environ.get("MTP_LIGHTNING_CACHE") or Path.home() / ".cache" / "mtp_lightning"
    root = Path(cache_dir or default).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts."""
    text = json.dumps([FORMAT_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def save_array(path: Path, array: np.ndarray) -> None:
    with writing(path, what="token cache") as f:  # a file object, so numpy does not append a second '.npy'
        np.save(f, array)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def tokenize_documents(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """One flat stream (L,): doc0, eot, doc1, eot, ... in the smallest dtype that holds every id."""
    dtype = token_dtype(tok.vocab_size)
    pieces: list[np.ndarray] = []
    for i in range(0, len(texts), _ENCODE_CHUNK):
        for ids in tok.encode_batch(texts[i : i + _ENCODE_CHUNK]):
            pieces.append(np.asarray(ids, dtype=dtype))
            pieces.append(np.asarray([tok.eot_id], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)


def bpe_texts(texts: list[str], max_bytes: int) -> Iterator[str]:
    """The first ``max_bytes`` UTF-8 bytes of the texts, in order (the last one cut), for BPE training."""
    budget = ByteBudget(max_bytes)
    for text in texts:
        yield budget.take(text)
        if budget.done:
            return
