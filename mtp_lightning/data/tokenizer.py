"""A thin wrapper over a ``tokenizers.Tokenizer`` that knows its end-of-text token.

Three ways to get one: train a byte-level BPE (``train_bpe``), load a tokenizer.json (``from_file``), or
load a Hugging Face tokenizer by name or folder (``from_hub``). What is special here:

- Text is encoded with ``encode_special_tokens=True``: a literal ``<|endoftext|>`` inside a document is
  ordinary text, so the eot id appears only where the data pipeline puts it (between documents).
- ``to_json`` wraps the tokenizer.json with the name of its eot token, so a tokenizer stored in a
  checkpoint comes back exactly (same ids, same ``fingerprint``). ``save`` writes a plain tokenizer.json
  that other tools read; loading one finds eot in a ``tokenizer_config.json`` beside it or by name.
- ``token_bytes`` gives the UTF-8 length of every token, for bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mtp_lightning.atomic import write_text
from mtp_lightning.data.hub import offline_unless_reachable
from mtp_lightning.errors import UserError

EOT = "<|endoftext|>"
FORMAT = "mtp_lightning.tokenizer/1"
# End-of-text names used by common tokenizers, tried in order when nothing names the eot token.
_EOS_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) map in byte order to
    U+0100 onwards. Byte-level BPE tokens are strings over these 256 characters, one per byte.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


UNICODE_TO_BYTE = {ch: b for b, ch in bytes_to_unicode().items()}


def _mentions_byte_level(node) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_mentions_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_mentions_byte_level(v) for v in node)
    return False


def _eos_from_config(folder: Path) -> str | None:
    """The eos token named in a Hugging Face ``tokenizer_config.json``, if there is one."""
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    eos = json.loads(cfg.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eot_token: str | None = None, origin: str = "tokenizer",
                 fix: str = "use tokenizer.kind=bpe or a tokenizer with an EOS token"):
        """``fix`` ends the error of a tokenizer without an end-of-text token (as in ``from_file``)."""
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = True
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        if eot_token is None or eot_token not in vocab:
            eot_token = next((name for name in _EOS_NAMES if name in vocab), None)
        if eot_token is None:
            raise UserError(f"{origin} has no end-of-text token (looked for {', '.join(_EOS_NAMES)}); "
                            f"{fix}")
        self.eot_token = eot_token
        self.eot_id = vocab[eot_token]
        # ids may have holes (some hub vocabularies): the embedding must cover the largest id
        self.vocab_size = max(vocab.values()) + 1

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Byte-level BPE with one special token, ``<|endoftext|>`` (id 0). Same texts, same result."""
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            # all 256 byte symbols up front: any text encodes, even bytes the corpus never showed
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, EOT)

    @classmethod
    def from_json(cls, text: str, origin: str = "tokenizer JSON", eot_token: str | None = None,
                  fix: str | None = None) -> Tokenizer:
        """From ``to_json()``'s output, or from the text of a plain tokenizer.json (then ``eot_token``,
        or a standard end-of-text name, is the eot)."""
        try:
            data = json.loads(text)
            extra = {} if fix is None else {"fix": fix}
            if isinstance(data, dict) and data.get("format") == FORMAT:
                return cls(HFTokenizer.from_str(json.dumps(data["tokenizer"])), data["eot_token"], origin, **extra)
            return cls(HFTokenizer.from_str(text), eot_token, origin, **extra)
        except UserError:
            raise
        except Exception as e:  # json and the Rust deserializer raise different types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{origin} is not a valid tokenizer.json ({first}); give a file written "
                            f"by the tokenizers library") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, fix: str | None = None) -> Tokenizer:
        """A tokenizer.json (or a folder holding one); eot from a tokenizer_config.json beside it.
        ``fix``, when given, is the way out that a missing file or EOS token names: under a pretrained
        backbone a trained BPE cannot replace the model's tokenizer, so the default hint would mislead."""
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise UserError(f"tokenizer file '{p}' does not exist; " + (
                fix or "set tokenizer.path to a tokenizer.json (or use tokenizer.kind=bpe to train one)"))
        return cls.from_json(p.read_text(encoding="utf-8"), f"tokenizer file '{path}'",
                             eot_token=_eos_from_config(p.parent), fix=fix)

    @classmethod
    def from_hub(cls, name_or_folder: str, fix: str | None = None) -> Tokenizer:
        """A local folder with tokenizer.json (offline), else a hub name via transformers or tokenizers;
        ``fix`` as in ``from_file``."""
        extra = {} if fix is None else {"fix": fix}
        if Path(name_or_folder).expanduser().is_dir():
            return cls.from_file(name_or_folder, fix)
        with offline_unless_reachable() as why:
            try:
                try:
                    from transformers import AutoTokenizer
                except ImportError:
                    return cls(HFTokenizer.from_pretrained(name_or_folder), None, name_or_folder, **extra)
                hf = AutoTokenizer.from_pretrained(name_or_folder)
                backend = getattr(hf, "backend_tokenizer", None)
                if backend is None:
                    raise UserError(f"tokenizer '{name_or_folder}' has no fast (Rust) version; "
                                    f"use a tokenizer that ships tokenizer.json")
                return cls(backend, hf.eos_token, name_or_folder, **extra)
            except UserError:
                raise
            except Exception as e:  # network, missing repo, missing files
                reason = why or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise UserError(f"tokenizer '{name_or_folder}' cannot be loaded ({reason}); " + (
                    fix or "give a local folder with tokenizer.json, or use tokenizer.kind=bpe")) from None

    # ---- serialisation --------------------------------------------------------------------------
    def to_json(self) -> str:
        """The tokenizer and its eot token as one JSON string (travels inside checkpoints)."""
        # spliced as text: the tokenizer's own serialisation stays byte-identical, so is the fingerprint
        head = json.dumps({"format": FORMAT, "eot_token": self.eot_token})[:-1]
        return f'{head}, "tokenizer": {self._tok.to_str()}}}'

    def save(self, path: str | os.PathLike) -> None:
        """A plain tokenizer.json, written atomically (readers never see half)."""
        write_text(path, self._tok.to_str(), what="tokenizer")

    def fingerprint(self) -> str:
        return hashlib.blake2b(self.to_json().encode("utf-8"), digest_size=8).hexdigest()

    # ---- use ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once on the Rust thread pool (no offsets computed)."""
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def backend(self) -> HFTokenizer:
        return self._tok

    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes each token id stands for, (V,) int64; special tokens and unused ids count 0.

        Exact for byte-level BPE (each character of a token is one byte through GPT-2's table). For
        other tokenizers it is the length of the token's text with SentencePiece's '▁' as a space and
        ``<0xNN>`` byte-fallback pieces as one byte: a close estimate, as normalizers may alter text.
        """
        added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}
        byte_level = _mentions_byte_level(json.loads(self._tok.to_str()).get("decoder"))
        out = torch.zeros(self.vocab_size, dtype=torch.long)  # (V,)
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in added:
                out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            elif byte_level:
                out[i] = sum(1 if ch in UNICODE_TO_BYTE else len(ch.encode("utf-8")) for ch in token)
            elif _BYTE_FALLBACK.match(token):
                out[i] = 1
            else:
                out[i] = len(token.removeprefix("##").replace("▁", " ").encode("utf-8"))
        return out
