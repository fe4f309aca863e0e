"""Lightning DataModules over a tokenised, packed corpus.

``prepare_corpus()`` does all the work once and caches it (see ``cache.py``): read the source, split it
by document, train or load the tokenizer, tokenise every split. A cache entry is checked against its
manifest (sizes and checksums) before use, and rebuilt with a note when it is damaged. ``prepare_data`` (local rank 0) and
``setup`` (every rank) both call it; the second call in a process is free and other processes read the
cache. The CLI may call it earlier to learn the vocabulary size before building the model.

Batches are windows (B, seq_len + n_future) as int64; the LightningModule splits them with
``packing.split_window``. Training order: ``sampler.ResumableBatchSampler``, which shards across ranks
itself, so the Trainer must get ``use_distributed_sampler=False``. With that flag, validation and test
are not sharded: every rank evaluates the same windows (same numbers, no gain from more ranks).

``kind`` picks the class; the two differ only in the corpus used when ``data.source`` is left at its
default: ``stdlib`` for ``code``, ``shakespeare`` for ``text`` (so a text run on the stdlib needs
``kind=code``).
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, default_collate

from mtp_lightning.atomic import cached_entry, sidecar, write_text
from mtp_lightning.config import DataConfig, TokenizerConfig
from mtp_lightning.data.cache import bpe_texts, cache_root, fingerprint, save_array, tokenize_documents
from mtp_lightning.data.corpora import Corpus
from mtp_lightning.data.hidden_cache import HiddenStates, ensure_states, run_window_ids
from mtp_lightning.data.packing import num_windows, pack_windows
from mtp_lightning.data.sampler import ResumableBatchSampler
from mtp_lightning.data.splits import SPLITS, split_documents
from mtp_lightning.data.tokenizer import Tokenizer
from mtp_lightning.errors import UserError

log = logging.getLogger(__name__)


def _as_batch(data):
    """The dataset already stacked the batch in ``__getitems__`` (windows, or windows and their hidden
    states as a tuple); anything else collates as usual."""
    return data if isinstance(data, (torch.Tensor, tuple)) else default_collate(data)


class WindowDataset(Dataset):
    """Windows of one split's token stream (``packing.pack_windows``), read from a memory-mapped .npy.

    The map is opened lazily and dropped on pickling, so DataLoader workers and spawned ranks each
    open their own instead of receiving a copy of the array. With ``hidden`` set (a frozen backbone's
    cached states, ``hidden_cache.py``) a batch is the tuple (windows (B, T+n), z (B, T, D)).
    """

    def __init__(self, path: Path, n_tokens: int, seq_len: int, n_future: int):
        self.path, self.seq_len, self.n_future = path, seq_len, n_future
        self.n = num_windows(n_tokens, seq_len, n_future)
        self._view: np.ndarray | None = None
        self.hidden: HiddenStates | None = None

    def _windows(self) -> np.ndarray:
        if self._view is None:
            self._view = pack_windows(np.load(self.path, mmap_mode="r"), self.seq_len, self.n_future)
        return self._view  # (N, T+n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._windows()[i].astype(np.int64))  # (T+n,)

    def __getitems__(self, indices: list[int]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # one fancy-index gather per batch instead of B small reads
        windows = torch.from_numpy(self._windows()[np.asarray(indices)].astype(np.int64))  # (B, T+n)
        z = None if self.hidden is None else self.hidden.gather(indices)  # (B, T, D)
        return windows if z is None else (windows, z)

    def inputs(self, ids: np.ndarray) -> torch.Tensor:
        """The input tokens (k, T) of windows ``ids``: what the trunk reads."""
        return torch.from_numpy(self._windows()[ids][:, :self.seq_len].astype(np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_view": None}


class CorpusDataModule(L.LightningDataModule):
    default_source = "stdlib"
    """The corpus used when ``data.source`` is left at the schema's default."""

    def __init__(self, data: DataConfig, tokenizer: TokenizerConfig, n_future: int, seed: int):
        super().__init__()
        self.cfg = data
        self.tok_cfg = tokenizer
        self.n_future = n_future
        self.seed = seed
        self.source = self.default_source if data.source == DataConfig.source else data.source
        self._tokenizer: Tokenizer | None = None
        self._meta: dict | None = None  # set once the corpus is prepared
        self._datasets: dict[str, WindowDataset] = {}
        self._bytes_per_token: torch.Tensor | None = None
        self._loaded_state: dict | None = None
        self.tokenizer_origin = ""
        """Where the tokenizer came from, for the run's preamble (set by ``prepare_corpus``)."""

    # ---- preparing ------------------------------------------------------------------------------
    def set_tokenizer(self, tok: Tokenizer) -> None:
        """Use this tokenizer (from a checkpoint) instead of training or loading one."""
        self._tokenizer = tok
        self._meta, self._datasets, self._bytes_per_token = None, {}, None
        self.tokenizer_origin = "from the checkpoint"

    def prepare_corpus(self) -> Tokenizer:
        """Tokenizer and tokenised splits, from the cache or built once. Idempotent."""
        if self._meta is not None:
            return self._tokenizer
        d = self.cfg
        root = cache_root(d.cache_dir)
        corpus = Corpus(self.source, text_column=d.text_column, hub_config=d.hub_config,
                        hub_split=d.hub_split, max_bytes=d.max_bytes)
        corpus_key = fingerprint("corpus", corpus.identity, d.max_bytes, d.val_fraction)
        splits: dict[str, list[str]] = {}

        def get_splits() -> dict[str, list[str]]:  # read at most once, and only on a cache miss
            if not splits:
                splits.update(split_documents(corpus.documents(), d.val_fraction))
            return splits

        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer(root, corpus_key, get_splits)
        tok = self._tokenizer
        folder = root / f"corpus-{fingerprint(corpus_key, tok.fingerprint())}"
        meta = cached_entry(folder / "meta.json", lambda: self._build(folder, corpus_key, tok, get_splits()),
                            f"the token cache '{folder}'")
        self._meta = {**meta, "folder": str(folder)}
        self._check_sizes()
        return tok

    def _load_tokenizer(self, root: Path, corpus_key: str, get_splits) -> Tokenizer:
        k = self.tok_cfg
        if k.kind in ("file", "hub") and not k.path:
            raise UserError(f"tokenizer.kind={k.kind} needs tokenizer.path (a tokenizer.json"
                            f"{'' if k.kind == 'file' else ', a folder or a hub name'})")
        if k.kind in ("file", "hub"):
            self.tokenizer_origin = f"loaded from {k.path}"
            return Tokenizer.from_file(k.path) if k.kind == "file" else Tokenizer.from_hub(k.path)
        if k.kind != "bpe":
            raise UserError(f"tokenizer.kind={k.kind!r} is not one of bpe, file, hub")
        path = root / f"tokenizer-{fingerprint('bpe', corpus_key, k.vocab_size, k.train_bytes)}.json"

        self.tokenizer_origin = f"BPE loaded from the cache ({path})"

        def train() -> tuple[list[Path], dict]:
            log.info("training a byte-level BPE (vocab %d) on the train split of %s", k.vocab_size, self.source)
            Tokenizer.train_bpe(bpe_texts(get_splits()["train"], k.train_bytes), k.vocab_size).save(path)
            self.tokenizer_origin = f"BPE trained on the train split, cached at {path}"
            return [path], {}

        cached_entry(sidecar(path), train, f"the tokenizer cache '{path}'")
        return Tokenizer.from_file(path)

    def _build(self, folder: Path, corpus_key: str, tok: Tokenizer,
               splits: dict[str, list[str]]) -> tuple[list[Path], dict]:
        log.info("tokenising %s into %s", self.source, folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta: dict = {"source": self.source, "corpus_key": corpus_key, "tokenizer": tok.fingerprint(),
                      "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "documents": {}, "bytes": {},
                      "tokens": {}}
        files = []
        for name in SPLITS:
            tokens = tokenize_documents(tok, splits[name])  # (L,)
            files.append(folder / f"{name}.npy")
            save_array(files[-1], tokens)
            meta["documents"][name] = len(splits[name])
            meta["bytes"][name] = sum(len(t.encode("utf-8")) for t in splits[name])
            meta["tokens"][name] = int(tokens.size)
        return files, meta  # the manifest, written last, marks the folder complete

    def _check_sizes(self) -> None:
        width = self.cfg.seq_len + self.n_future
        for name in SPLITS:
            n_tokens = self._meta["tokens"][name]
            if num_windows(n_tokens, self.cfg.seq_len, self.n_future) == 0:
                raise UserError(f"the {name} split of data.source '{self.source}' has {n_tokens} tokens, "
                                f"fewer than one window of data.seq_len + n_future = {width}; lower "
                                f"data.seq_len, raise data.val_fraction or data.max_bytes, or add text")

    def prepare_data(self) -> None:
        self.prepare_corpus()

    def setup(self, stage: str) -> None:
        self.prepare_corpus()

    # ---- what the model needs -------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (prepares the corpus on first use)."""
        return self.prepare_corpus()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def bytes_per_token(self) -> torch.Tensor:
        """UTF-8 bytes of each token id, (V,) int64: bits/byte = sum NLL / ln 2 / sum bytes[targets]."""
        if self._bytes_per_token is None:
            self._bytes_per_token = self.tokenizer.token_bytes()
        return self._bytes_per_token

    @property
    def stats(self) -> dict:
        """Documents, bytes and tokens per split, and where the cache lives."""
        self.prepare_corpus()
        return dict(self._meta)

    def split_path(self, split: str) -> Path:
        self.prepare_corpus()
        return Path(self._meta["folder"]) / f"{split}.npy"

    def token_counts(self, vocab_size: int, split: str = "train") -> np.ndarray:
        """(vocab_size,) int64: how often each id occurs in a tokenised split (the draft vocabulary's
        frequency ranking, ``model/draft_vocab.py``)."""
        return np.bincount(np.load(self.split_path(split), mmap_mode="r"), minlength=vocab_size)

    def gzip_bits_per_byte(self, split: str = "val") -> float:
        """gzip -9's bits per byte on the split's text (documents joined, separators dropped): the
        baseline a model's bits per byte is read against. Computed once per cached corpus."""
        path = Path(self.stats["folder"]) / f"{split}-gzip9.json"
        try:
            return float(json.loads(path.read_text(encoding="utf-8"))["bits_per_byte"])
        except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: recompute, it is cheap
            pass
        eot = self.tokenizer.eot_id
        text = self.tokenizer.decode([i for i in np.load(self.split_path(split)).tolist() if i != eot])
        data = text.encode("utf-8")
        value = 8 * len(gzip.compress(data, 9)) / max(len(data), 1)
        write_text(path, json.dumps({"bits_per_byte": value, "bytes": len(data)}), "the gzip baseline cache")
        return value

    def _dataset(self, split: str) -> WindowDataset:
        self.prepare_corpus()
        if split not in self._datasets:
            self._datasets[split] = WindowDataset(self.split_path(split), self._meta["tokens"][split],
                                                  self.cfg.seq_len, self.n_future)
        return self._datasets[split]

    def cache_hidden_states(self, backbone_key: str, encode, train_batches: int, val_batches: int,
                            report=None) -> None:
        """Attach the frozen backbone's cached hidden states (``hidden_cache.py``) to the train and
        validation windows, building or extending the cache first: the windows of the first
        ``train_batches`` global training batches (0: all) and of the first ``val_batches`` validation
        batches. ``backbone_key`` identifies the backbone's weights and the precision it runs in;
        ``encode`` maps input tokens (k, T) to z (k, T, D). The test split is not cached."""
        root = cache_root(self.cfg.cache_dir)
        corpus = Path(self.stats["folder"]).name  # the corpus and the tokenizer
        B = self.cfg.batch_size
        for split in ("train", "val"):
            ds = self._dataset(split)
            if split == "train":
                needed = run_window_ids(len(ds), B, self.seed, train_batches)
            else:
                needed = np.arange(min(len(ds), val_batches * B), dtype=np.int64)
            if not len(needed):
                continue
            folder = root / f"hidden-{fingerprint('hidden', backbone_key, corpus, self.cfg.seq_len, split)}"
            ds.hidden = ensure_states(folder, needed, ds.inputs, encode, B, report)

    # ---- loaders --------------------------------------------------------------------------------
    def _progress(self) -> tuple[int, int, int, int, int]:
        """(rank, world_size, global_step, accumulate_grad_batches, max_steps) from the Trainer."""
        t = self.trainer
        if t is None:
            return 0, 1, 0, 1, -1
        return t.global_rank, t.world_size, t.global_step, t.accumulate_grad_batches, t.max_steps

    def consumed_samples(self) -> int:
        """Training windows used by all ranks together so far (from the Trainer, else a loaded state)."""
        _, world, step, accum, _ = self._progress()
        if self.trainer is None and self._loaded_state is not None:
            return int(self._loaded_state["consumed_samples"])
        return step * accum * self.cfg.batch_size * world

    def train_sampler(self) -> ResumableBatchSampler:
        ds = self._dataset("train")
        rank, world, step, accum, max_steps = self._progress()
        consumed = self.consumed_samples()
        saved = (self._loaded_state or {}).get("consumed_samples")
        if self.trainer is not None and saved is not None and saved != consumed:
            rank_zero_warn(f"the checkpoint's data state says {saved} samples were consumed, but global_step "
                           f"{step} gives {consumed} (batch size, devices or accumulation changed?); "
                           f"resuming at {consumed}")
        # One epoch covers the whole run when max_steps is set, else one pass over the data. Lightning
        # restores how many batches of the current epoch are done; the sampler must skip as many.
        done = step * accum
        if max_steps > 0:
            length, skip = max_steps * accum, min(done, max_steps * accum)
        else:
            length = max(1, len(ds) // (self.cfg.batch_size * world))
            skip = done % length
        return ResumableBatchSampler(len(ds), self.cfg.batch_size, self.seed, rank=rank, world_size=world,
                                     start_sample=consumed, length=length, skip=skip)

    def _loader(self, ds: Dataset, **kwargs) -> DataLoader:
        workers = self.cfg.num_workers
        # the loader's own generator: creating an iterator otherwise draws a seed from the global RNG,
        # and a resumed run creates one at a point where the uninterrupted run did not
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, collate_fn=_as_batch, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available(), generator=generator, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Batches (B, seq_len + n_future), resumed at ``consumed_samples()``, sharded by rank."""
        return self._loader(self._dataset("train"), batch_sampler=self.train_sampler())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"), batch_size=self.cfg.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), batch_size=self.cfg.batch_size, shuffle=False)

    def val_prompts(self, k: int, prompt_len: int, split: str = "val") -> torch.Tensor:
        """k prompts (k, prompt_len) int64, evenly spaced over a held-out split: the same every call."""
        tokens = np.load(self.split_path(split), mmap_mode="r")
        if len(tokens) < prompt_len:
            raise UserError(f"the {split} split has {len(tokens)} tokens, fewer than a prompt of "
                            f"{prompt_len}; lower spec.prompt_len or use a bigger corpus")
        starts = np.linspace(0, len(tokens) - prompt_len, num=k).round().astype(np.int64)  # (k,)
        idx = starts[:, None] + np.arange(prompt_len)  # (k, prompt_len)
        return torch.from_numpy(tokens[idx].astype(np.int64))

    # ---- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Stored in checkpoints to check the resume; the resume point itself comes from global_step."""
        _, world, *_ = self._progress()
        return {"consumed_samples": self.consumed_samples(), "batch_size": self.cfg.batch_size,
                "world_size": world, "seed": self.seed, "source": self.source,
                "tokenizer": self._tokenizer.fingerprint() if self._tokenizer else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded_state = dict(state_dict)


class CodeDataModule(CorpusDataModule):
    default_source = "stdlib"


class TextDataModule(CorpusDataModule):
    default_source = "shakespeare"


DATAMODULES: dict[str, type[CorpusDataModule]] = {"code": CodeDataModule, "text": TextDataModule}


def build_datamodule(data_cfg: DataConfig, tok_cfg: TokenizerConfig, n_future: int,
                     seed: int) -> CorpusDataModule:
    if data_cfg.kind not in DATAMODULES:
        raise UserError(f"data.kind={data_cfg.kind!r} is not one of {', '.join(DATAMODULES)}")
    return DATAMODULES[data_cfg.kind](data_cfg, tok_cfg, n_future, seed)


def checkpoint_datamodule(data_cfg: DataConfig, tok_cfg: TokenizerConfig, n_future: int, seed: int,
                          tokenizer: Tokenizer) -> CorpusDataModule:
    """A run's DataModule rebuilt around the tokenizer its checkpoint carries (so the splits are tokenised
    as in training), with its corpus prepared: what evaluation and decoding read prompts from."""
    dm = build_datamodule(data_cfg, tok_cfg, n_future, seed)
    dm.set_tokenizer(tokenizer)
    dm.prepare_corpus()
    return dm
