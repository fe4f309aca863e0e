"""The data layer: corpora, splits, tokenizer, packing into windows, the resumable sampler, DataModules.

Only ``datamodule`` imports Lightning, and it is imported on first use of one of its names, so
``from mtp_lightning.data import split_window`` stays light (no Lightning import).
"""

from mtp_lightning.data.corpora import EMBEDDED, Corpus, Document
from mtp_lightning.data.packing import num_windows, pack_windows, split_window
from mtp_lightning.data.sampler import ResumableBatchSampler
from mtp_lightning.data.splits import SPLITS, split_documents
from mtp_lightning.data.tokenizer import EOT, Tokenizer

_LIGHTNING_NAMES = ("CodeDataModule", "CorpusDataModule", "TextDataModule", "WindowDataset",
                    "build_datamodule", "checkpoint_datamodule")

__all__ = [
    "EMBEDDED", "EOT", "SPLITS", "Corpus", "Document", "ResumableBatchSampler", "Tokenizer",
    "num_windows", "pack_windows", "split_documents", "split_window", *_LIGHTNING_NAMES,
]


def __getattr__(name: str):
    if name in _LIGHTNING_NAMES:
        from mtp_lightning.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
