"""From ``data.source`` to a list of documents.

A source is one of:

- an embedded corpus: ``stdlib`` (the running interpreter's standard library ``.py`` files, without
  test folders or site-packages) or ``shakespeare`` (the complete works, shipped in this package as
  ``shakespeare.jsonl.xz``; see PROVENANCE.md);
- a local file, folder (walked recursively) or glob: ``.jsonl``/``.json``/``.parquet`` files give one
  document per row of ``data.text_column``; any other file (``.txt``, source code) is one document;
- a hub id ``owner/name``: ``load_dataset(id, data.hub_config, split=data.hub_split)``, failing within
  seconds when the hub is unreachable and the dataset is not cached (see ``hub.py``).

Each document carries a ``key`` that decides its split (``splits.py``): the path relative to the source
root for files, the text itself for rows (so exact duplicates never straddle train and val).
``Corpus.identity`` describes the source without reading it (paths, sizes, mtimes), for cache keys.
Reading is in a fixed order (sorted paths, row order), so ``max_bytes`` always keeps the same prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from glob import glob, has_magic
from pathlib import Path

from mtp_lightning.data.hub import offline_unless_reachable
from mtp_lightning.errors import UserError, closest

EMBEDDED = ("stdlib", "shakespeare")
SHAKESPEARE_PATH = Path(__file__).with_name("shakespeare.jsonl.xz")
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_SUFFIXES = frozenset(
    ".txt .md .rst .py .pyi .c .h .cc .cpp .hpp .cu .rs .go .java .js .ts .sh .lua .rb .jl".split()
)
# Folders never walked: caches, environments, and (for stdlib) installed packages and test suites.
_SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "dist-packages"})
_STDLIB_SKIP_DIRS = _SKIP_DIRS | {"test", "tests", "idle_test"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ALTERNATIVES = ("use an embedded corpus (data.source=stdlib or shakespeare) or local files "
                 "(a .txt/.jsonl/.parquet file, a folder or a glob)")


@dataclass(frozen=True)
class Document:
    key: str
    """What the split hash sees: a relative path, or the text of a row."""
    text: str


class ByteBudget:
    """``max_bytes`` over the whole read: hands out what is left, in UTF-8 bytes (0 means no cap)."""

    def __init__(self, max_bytes: int):
        self.left = max_bytes if max_bytes > 0 else None

    @property
    def done(self) -> bool:
        return self.left is not None and self.left <= 0

    def take(self, text: str) -> str:
        if self.left is None:
            return text
        raw = text.encode("utf-8")
        if len(raw) > self.left:
            # cut on a character boundary: drop the partial UTF-8 sequence at the end
            text = raw[: self.left].decode("utf-8", errors="ignore")
            raw = text.encode("utf-8")
        self.left -= len(raw)
        return text


def _walk(root: Path, skip: frozenset[str], suffixes: Iterable[str]) -> list[Path]:
    """Files under root with one of the suffixes, sorted by relative path; hidden entries skipped."""
    wanted = set(suffixes)
    out = []
    for folder, dirs, files in os.walk(root):
        # pruning in place stops os.walk from descending (site-packages can be huge)
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        out += [Path(folder, f) for f in files if Path(f).suffix in wanted and not f.startswith(".")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, _walk(root, _STDLIB_SKIP_DIRS, {".py"})


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars for the small local loads; restore the user's setting afterwards."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def read_text_file(path: Path, limit: int | None = None, strict: bool = True) -> str | None:
    """A whole file as text. Binary or non-UTF-8 files raise (``strict``) or give None (skipped)."""
    with open(path, "rb") as f:
        raw = f.read(-1 if limit is None else limit)
    if b"\0" in raw[:8192]:
        if not strict:
            return None
        raise UserError(f"data.source file '{path}' looks binary (it holds NUL bytes), not text; "
                        f"remove it or point data.source at text files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        cut_mid_char = limit is not None and len(raw) == limit and e.start >= len(raw) - 3
        if cut_mid_char:  # max_bytes ended inside a multi-byte character: not the file's fault
            text = raw[: e.start].decode("utf-8")
        elif not strict:
            return None
        else:
            raise UserError(f"data.source file '{path}' is not valid UTF-8 (byte {e.start}); re-encode "
                            f"it as UTF-8 (e.g. iconv -t utf-8) or remove it") from None
    return text.removeprefix("\ufeff")


class Corpus:
    """A resolved ``data.source``: what will be read, and a cheap identity for cache keys."""

    def __init__(self, source: str, *, text_column: str = "text", hub_config: str = "",
                 hub_split: str = "train", max_bytes: int = 0):
        self.source = source
        self.text_column = text_column
        self.hub_config = hub_config
        self.hub_split = hub_split
        self.max_bytes = max_bytes
        self.kind, self.root, self.files = self._resolve(source)

    # ---- what the source is -------------------------------------------------------------------
    @staticmethod
    def _resolve(source: str) -> tuple[str, Path | None, list[Path]]:
        if source == "stdlib":
            root, files = stdlib_files()
            return "stdlib", root, files
        if source == "shakespeare":
            return "shakespeare", SHAKESPEARE_PATH.parent, [SHAKESPEARE_PATH]
        if has_magic(source):
            matches = sorted(Path(p) for p in glob(os.path.expanduser(source), recursive=True))
            files = []
            for m in matches:
                files += _walk(m, _SKIP_DIRS, TEXT_SUFFIXES | set(TABLE_BUILDERS)) if m.is_dir() else [m]
            if not files:
                raise UserError(f"data.source glob '{source}' matches no files; fix the pattern or "
                                f"{_ALTERNATIVES}")
            # keys are relative to the glob's literal prefix, so they do not depend on what matched
            parts = Path(os.path.expanduser(source)).parts
            first_magic = next(i for i, part in enumerate(parts) if has_magic(part))
            prefix = Path(*parts[:first_magic]) if first_magic else Path(".")
            return "files", prefix, sorted(set(files))
        path = Path(source).expanduser()
        if path.is_file():
            return "files", path.parent, [path]
        if path.is_dir():
            files = _walk(path, _SKIP_DIRS, TEXT_SUFFIXES | set(TABLE_BUILDERS))
            if not files:
                raise UserError(f"data.source folder '{source}' holds no .txt/.jsonl/.json/.parquet or "
                                f"source files; add some, or {_ALTERNATIVES}")
            return "files", path, files
        looks_like_file = Path(source).suffix in TEXT_SUFFIXES | set(TABLE_BUILDERS)
        if _HUB_ID.match(source) and not looks_like_file and not source.startswith("."):
            return "hub", None, []
        if not any(c in source for c in "/\\.~"):
            raise UserError(f"unknown embedded corpus data.source='{source}'{closest(source, EMBEDDED)}; "
                            f"choose one of {', '.join(EMBEDDED)}, or give a local path or a hub id "
                            f"owner/name")
        raise UserError(f"data.source path '{source}' does not exist; give an existing file, folder or "
                        f"glob, or {_ALTERNATIVES.removeprefix('use ')}")

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:  # a glob match outside its literal prefix (e.g. '../'): keep it whole
            return path.as_posix()

    @cached_property
    def identity(self) -> str:
        """Enough to tell two sources apart without reading them: a change of any file changes it."""
        ident: dict = {"kind": self.kind, "text_column": self.text_column}
        if self.kind == "hub":
            ident.update(id=self.source, config=self.hub_config, split=self.hub_split)
        elif self.kind == "shakespeare":
            ident["blake2b"] = hashlib.blake2b(SHAKESPEARE_PATH.read_bytes(), digest_size=16).hexdigest()
        else:
            if self.kind == "stdlib":
                ident["python"] = sys.version
            stats = [(self._relative(p), p.stat()) for p in self.files]
            ident["files"] = [(rel, st.st_size, st.st_mtime_ns) for rel, st in stats]
        return json.dumps(ident, sort_keys=True)

    # ---- reading ------------------------------------------------------------------------------
    def documents(self) -> list[Document]:
        """Every non-blank document, in a fixed order, stopping once ``max_bytes`` have been read."""
        budget = ByteBudget(self.max_bytes)
        docs: list[Document] = []
        for doc in self._iter_raw(budget):
            if doc.text.strip():
                docs.append(doc)
            if budget.done:
                break
        if not docs:
            what = f"{len(self.files)} file(s)" if self.files else "every row"
            raise UserError(f"data.source '{self.source}' holds no text ({what} read, all empty); "
                            f"point it at non-empty files or set data.text_column")
        return docs

    def _iter_raw(self, budget: ByteBudget) -> Iterator[Document]:
        if self.kind == "shakespeare":
            with lzma.open(SHAKESPEARE_PATH, "rt", encoding="utf-8") as f:
                for line in f:
                    record = json.loads(line)
                    yield Document(record["source_file"], budget.take(record["text"]))
            return
        if self.kind == "hub":
            yield from self._rows(self._load_hub(), self.source, budget)
            return
        for path in self.files:
            if path.suffix in TABLE_BUILDERS:
                yield from self._rows(self._load_table(path), str(path), budget)
            else:
                # stdlib: a stray non-UTF-8 file is skipped; a user's own file is an error
                text = read_text_file(path, budget.left, strict=self.kind != "stdlib")
                if text is not None:
                    yield Document(self._relative(path), budget.take(text))
            if budget.done:
                return

    def _rows(self, ds, where: str, budget: ByteBudget) -> Iterator[Document]:
        col = self.text_column
        if col not in ds.column_names:
            raise UserError(f"'{where}' has no column data.text_column='{col}' (columns: "
                            f"{', '.join(ds.column_names)}); set data.text_column to one of them")
        for batch in ds.select_columns([col]).iter(batch_size=1024):
            for value in batch[col]:
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise UserError(f"column data.text_column='{col}' of '{where}' holds "
                                    f"{type(value).__name__} values, not text; pick a text column")
                text = budget.take(value)
                yield Document(text, text)
                if budget.done:
                    return

    def _load_table(self, path: Path):
        from datasets import load_dataset

        builder = TABLE_BUILDERS[path.suffix]
        try:
            with _quiet_datasets():
                return load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # the parser's own error type varies; the file is what the user fixes
            raise UserError(f"could not read '{path}' as {builder} ({_first_line(e)}); fix or remove "
                            f"the file") from None

    def _load_hub(self):
        from datasets import load_dataset

        name, cfg, split = self.source, self.hub_config or None, self.hub_split
        with offline_unless_reachable() as why:
            try:
                return load_dataset(name, cfg, split=split)
            except Exception as e:  # network, missing repo, bad config/split: all end as one line
                if why:
                    raise UserError(f"hub dataset '{name}' cannot be loaded: {why} and it is not in the "
                                    f"local HF cache; {_ALTERNATIVES}") from None
                raise UserError(f"hub dataset '{name}' (config {cfg!r}, split {split!r}) failed to "
                                f"load ({_first_line(e)}); check the id, data.hub_config and "
                                f"data.hub_split, or {_ALTERNATIVES}") from None
