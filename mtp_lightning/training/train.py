"""From a resolved ``Config`` to a Lightning run: the run directory, the Trainer, fit/validate/test.

Everything that can be wrong with the user's input (config, corpus, checkpoint, run name, devices) is
checked before the run directory is created, so a mistake leaves nothing half-made behind.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from mtp_lightning.atomic import write_text
from mtp_lightning.checkpoints.io import AtomicCheckpointIO, META_KEY, find_resume_checkpoint, safe_load
from mtp_lightning.config import Config, load_config, to_yaml
from mtp_lightning.data.packing import batch_windows, predicted_tokens
from mtp_lightning.errors import UserError
from mtp_lightning.machine import cpu_has_fast_bf16, describe_machine


@dataclass
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"


def resolve_resume(resume: str, files: list[str], overrides: list[str]) -> tuple[Config, Path, Path, dict]:
    """For ``--resume last|PATH``: the saved config with this invocation's files and overrides on top,
    the run directory, the checkpoint to continue from, and its contents."""
    if resume == "last":
        base = load_config(files, overrides)  # only to learn run.root / run.name
        run_dir = Path(base.run.root) / base.run.name
        if not run_dir.is_dir():
            raise UserError(f"nothing to resume: run '{base.run.name}' does not exist under "
                            f"'{base.run.root}'; start it with `fit` (without --resume) or set run.name")
        ckpt_path = find_resume_checkpoint(run_dir)
    else:
        ckpt_path = Path(resume)
        run_dir = ckpt_path.resolve().parent.parent
    ckpt = safe_load(ckpt_path)
    cfg = load_config(files, overrides, base=ckpt[META_KEY]["config"])
    cfg.run.root, cfg.run.name = str(run_dir.parent), run_dir.name
    return cfg, run_dir, ckpt_path, ckpt


def check_devices(cfg: Config) -> None:
    t = cfg.trainer
    gpu = t.accelerator in ("gpu", "cuda")
    if gpu and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={t.accelerator} but this machine has no CUDA GPU; "
                        f"use trainer.accelerator=cpu (or auto)")
    n = t.devices if isinstance(t.devices, int) else None
    if isinstance(t.devices, int) and t.devices < 1 and t.devices != -1:
        raise UserError(f"trainer.devices={t.devices} must be >= 1 (or -1 for all)")
    if n and n > 1 and t.strategy == "auto":
        pass  # Lightning picks ddp
    if gpu and n and n > torch.cuda.device_count():
        raise UserError(f"trainer.devices={n} but only {torch.cuda.device_count()} GPU(s) are visible; "
                        f"lower trainer.devices")
    if not gpu and n and n > (os.cpu_count() or 1) * 4:
        raise UserError(f"trainer.devices={n} CPU processes on a {os.cpu_count()}-core machine; "
                        f"lower trainer.devices")
    on_cpu = not gpu and not torch.cuda.is_available() or t.accelerator == "cpu"
    if t.precision == "16-mixed" and on_cpu:
        raise UserError("trainer.precision=16-mixed needs a GPU; use bf16-mixed or 32-true on the CPU")
    from mtp_lightning.training.distributed import check_parallel_config

    check_parallel_config(cfg)


def resolve_precision(cfg: Config) -> tuple[str, str]:
    """The Trainer's precision and why it was chosen (``trainer.precision=auto`` decides by the device)."""
    p = cfg.trainer.precision
    if p != "auto":
        return p, "trainer.precision"
    on_gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto"
                                                            and torch.cuda.is_available())
    if on_gpu:
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "auto: the GPU supports bf16"
        return "16-mixed", "auto: the GPU has no bf16"
    cpu = describe_machine()["cpu"]
    if cpu_has_fast_bf16():
        return "bf16-mixed", f"auto: {cpu} has native bf16 matmuls (AVX512-BF16/AMX)"
    return "32-true", f"auto: {cpu} has no AVX512-BF16/AMX, and bf16 matmuls there run slower than fp32"


def build_strategy(cfg: Config):
    s = cfg.trainer.strategy
    if s == "fsdp":
        from mtp_lightning.training.distributed import fsdp_strategy

        return fsdp_strategy(cfg)
    # draft tuning trains the draft maps only: DDP must not wait for the other parameters' gradients
    unused = cfg.draft_tuning.steps > 0
    if s in ("ddp", "ddp_spawn") and (unused or not torch.cuda.is_available()):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=None if torch.cuda.is_available() else "gloo",
                           start_method="spawn" if s == "ddp_spawn" else "popen",
                           find_unused_parameters=unused)
    return s


# module-level functions, not lambdas: ddp_spawn pickles the callbacks into its workers
def _windows_in(batch) -> int:
    return batch_windows(batch).shape[0]


class TrainingThroughput(ThroughputMonitor):
    """Lightning's throughput monitor, silent during draft tuning: those steps train on the model's own
    continuations, not on the loader's windows this monitor would count."""

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        if not getattr(pl_module, "draft_tuning", False):
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


def build_callbacks(cfg: Config, paths: RunPaths, n_future: int) -> list:
    from mtp_lightning.callbacks.acceptance import SpecAcceptanceCallback
    from mtp_lightning.callbacks.health import MixtureHistogramCallback
    from mtp_lightning.callbacks.safety import GracefulStopCallback

    c = cfg.checkpoint
    mode = "max" if "acceptance" in c.monitor else "min"
    callbacks = [
        # no version counter: last.ckpt is always the newest state (a graceful stop also writes it), never
        # a last-v1.ckpt beside a stale last.ckpt
        ModelCheckpoint(dirpath=paths.checkpoints, filename="step{step:07d}", save_last=True, save_top_k=0,
                        every_n_train_steps=c.every_n_steps, auto_insert_metric_name=False,
                        enable_version_counter=False),
        # it also rewrites last.ckpt after each validation: the periodic save above runs before that
        # step's validation, so its last.ckpt would record the best checkpoints as they were before it,
        # and a run resumed from it would never delete the best file that validation wrote
        ModelCheckpoint(dirpath=paths.checkpoints, monitor=c.monitor, mode=mode, save_top_k=c.save_top_k,
                        filename="best-step{step:07d}", auto_insert_metric_name=False, save_last=True,
                        save_on_train_epoch_end=False, enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
        TrainingThroughput(batch_size_fn=_windows_in, length_fn=functools.partial(predicted_tokens, n_future=n_future),
                          window_size=max(2, cfg.trainer.log_every_n_steps)),
        MixtureHistogramCallback(every_n_steps=cfg.trainer.log_every_n_steps),
        GracefulStopCallback(),
    ]
    if cfg.spec.every_n_val > 0:
        callbacks.append(SpecAcceptanceCallback.from_config(cfg.spec))
    return callbacks


class StepLogger(TensorBoardLogger):
    """TensorBoard at the run's one step convention: step N is the state after N optimizer steps
    (``trainer.global_step == N``). The N-th step's loss and learning rate, a validation after it and the
    checkpoints it wrote (``step000000N.ckpt``, ``best-step000000N.ckpt``, ``global_step`` inside) all
    carry N, as do the progress lines and the callbacks' histograms (written at ``global_step``).
    Lightning hands its loggers a 0-based index instead (``_batches_that_stepped``, N - 1 there)."""

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(metrics, None if step is None else step + 1)


class ProgressBar(TQDMProgressBar):
    """Lightning's bar with the loss and tokens/s, without the logger's version tag."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if getattr(pl_module, "draft_tuning", False):
            return metrics  # the monitor does not count draft-tuning steps
        monitor = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
        throughput = getattr(monitor, "_throughputs", {}).get(trainer.state.stage)
        # empty until the monitor has seen a batch (a run resumed straight into draft tuning never does)
        tps = throughput.compute().get("device/items_per_sec") if throughput is not None and throughput._time else None
        if tps is not None:
            metrics["tok/s"] = f"{float(tps):.0f}"
        return metrics


def build_trainer(cfg: Config, paths: RunPaths | None, n_future: int, quiet: bool = False) -> L.Trainer:
    """Without the bar (and unless ``quiet``) a fit prints a progress line every ``log_every_n_steps``."""
    t = cfg.trainer
    logger = False
    callbacks: list = []
    if paths is not None:
        logger = StepLogger(save_dir=str(paths.root), name="", version="tensorboard", default_hp_metric=False)
        callbacks = build_callbacks(cfg, paths, n_future)
    if t.progress_bar:
        callbacks.append(ProgressBar(refresh_rate=max(1, t.log_every_n_steps // 2)))
    elif paths is not None and not quiet:
        from mtp_lightning.callbacks.progress import ProgressLines

        callbacks.append(ProgressLines(t.log_every_n_steps, n_future))
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=build_strategy(cfg), precision=resolve_precision(cfg)[0],
        max_steps=t.max_steps + cfg.draft_tuning.steps, max_epochs=-1,
        # Lightning counts batches here, micro-batches under accumulation; the config promises optimizer steps
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        limit_test_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None, num_sanity_val_steps=t.num_sanity_val_steps,
        logger=logger, callbacks=callbacks, enable_progress_bar=t.progress_bar,
        enable_checkpointing=paths is not None, default_root_dir=str(paths.root) if paths else None,
        plugins=[AtomicCheckpointIO()] if t.strategy != "fsdp" else None,
        deterministic=cfg.run.deterministic or None, use_distributed_sampler=False,
        enable_model_summary=False,
    )


def is_launched_child() -> bool:
    """True in the worker processes Lightning's DDP launcher starts (they re-run this command)."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def build_data_and_module(cfg: Config, tokenizer_json: str | None = None):
    from mtp_lightning.data import build_datamodule
    from mtp_lightning.data.tokenizer import Tokenizer
    from mtp_lightning.model.gguf_backbone import inspect_gguf, is_gguf
    from mtp_lightning.training.lit_module import CPLightningModule

    hf = cfg.model.backbone.kind == "hf"
    gguf = hf and is_gguf(cfg.model.backbone.name_or_path)
    if gguf:
        # every check of the file that its metadata allows, before a corpus is read or a folder written
        inspect_gguf(cfg.model.backbone.name_or_path)
    dm = build_datamodule(cfg.data, cfg.tokenizer, cfg.model.heads.n_future, cfg.run.seed)
    if tokenizer_json is not None:
        dm.set_tokenizer(Tokenizer.from_json(tokenizer_json))
    elif hf:
        tok, origin = pretrained_tokenizer(cfg, gguf)
        if tok is not None:
            dm.set_tokenizer(tok)
            dm.tokenizer_origin = origin
    tok = dm.prepare_corpus()
    if hf:
        module = CPLightningModule(cfg, tok.token_bytes())
        check_hf_fit(cfg, module.model, tok.vocab_size)
    else:
        if cfg.model.gpt.vocab_size not in (0, tok.vocab_size):
            raise UserError(f"model.gpt.vocab_size={cfg.model.gpt.vocab_size} does not match the tokenizer's "
                            f"{tok.vocab_size}; leave model.gpt.vocab_size at 0 (it is set from the tokenizer)")
        cfg.model.gpt.vocab_size = tok.vocab_size
        module = CPLightningModule(cfg, tok.token_bytes())
    set_draft_vocabulary(module.model, dm)
    return dm, module, tok


def pretrained_tokenizer(cfg: Config, gguf: bool):
    """Under ``model.backbone.kind=hf``: the run's tokenizer and where it came from. ``tokenizer.kind=bpe``
    (the default) means the model's own: a pretrained model reads its own tokenizer's ids, a BPE
    trained here could not work. ``kind=file|hub`` names another tokenizer explicitly."""
    from mtp_lightning.data.tokenizer import Tokenizer
    from mtp_lightning.model.gguf_backbone import load_gguf_tokenizer

    name, k = cfg.model.backbone.name_or_path, cfg.tokenizer
    if k.kind == "bpe" and gguf:  # the tokenizer in the GGUF's metadata (tokenizer.kind stays bpe: "the model's")
        return load_gguf_tokenizer(name), f"model '{name}''s own (from its GGUF metadata)"
    if k.kind == "bpe":
        k.kind, k.path = "hub", name  # saved so: validate, test and a resume load the same tokenizer
        fix = (f"model '{name}' needs its own tokenizer: set tokenizer.kind=file and tokenizer.path to a "
               f"tokenizer.json with the model's ids")
        return Tokenizer.from_hub(name, fix=fix), f"model '{name}''s own"
    if k.kind not in ("file", "hub") or not k.path:
        return None, ""  # the datamodule reports the missing path, as for any backbone
    fix = (f"set tokenizer.path to a tokenizer.json with model '{name}''s ids, or leave tokenizer.kind=bpe "
           f"to use the model's own tokenizer")
    tok = Tokenizer.from_file(k.path, fix=fix) if k.kind == "file" else Tokenizer.from_hub(k.path, fix=fix)
    return tok, f"loaded from {k.path}"


def set_draft_vocabulary(model, dm) -> None:
    """With ``model.heads.draft_vocab`` = V' > 0: the heads' V' ids, the most frequent of the training
    split (``draft_vocab.frequency_ranking``). A resumed or evaluated run then loads the ones its
    checkpoint saved, which are these same ids for the same corpus and tokenizer."""
    from mtp_lightning.model.draft_vocab import frequency_ranking

    k, V = model.draft_vocab, model.unembedding.shape[0]
    if not k:
        return
    if k >= V:
        raise UserError(f"model.heads.draft_vocab={k} must be below the vocabulary size {V} (0 uses the full "
                        f"vocabulary); lower it")
    with torch.no_grad():
        model.heads.draft_ids.copy_(frequency_ranking(dm.token_counts(V), k))


def check_hf_fit(cfg: Config, model, tokenizer_size: int) -> None:
    """A pretrained model's sizes come from the model itself; check the run against them."""
    V, name = model.unembedding.shape[0], cfg.model.backbone.name_or_path
    if tokenizer_size > V:
        raise UserError(f"the tokenizer has {tokenizer_size} ids but model '{name}' embeds only {V}; "
                        f"use the model's own tokenizer (leave tokenizer.kind=bpe, it then loads it)")
    if cfg.data.seq_len > model.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds the {model.max_seq_len} positions of "
                        f"model '{name}'; lower data.seq_len")


def fit(files: list[str], overrides: list[str], resume: str | None = None, quiet: bool = False
        ) -> tuple[Path, object]:
    """Train (or continue) a run; returns the run directory and the graceful-stop record. Unless
    ``quiet``, a preamble (``summary.preamble_lines``) is printed before training and a summary after."""
    ckpt_path, ckpt = None, None
    tokenizer_json = None
    if resume:
        cfg, run_dir, ckpt_path, ckpt = resolve_resume(resume, files, overrides)
        tokenizer_json = ckpt[META_KEY]["tokenizer"]
    else:
        cfg = load_config(files, overrides)
        run_dir = Path(cfg.run.root) / cfg.run.name
        if run_dir.exists() and any(run_dir.iterdir()) and not is_launched_child():
            raise UserError(f"run '{cfg.run.name}' already exists at '{run_dir}'; continue it with "
                            f"`fit --resume last run.name={cfg.run.name}` or pick another run.name")
    check_devices(cfg)
    if ckpt_path is not None and ckpt_path.is_dir() and cfg.trainer.strategy != "fsdp":
        raise UserError(f"'{ckpt_path}' is a sharded checkpoint written under trainer.strategy=fsdp; resume it "
                        f"with trainer.strategy=fsdp (validate, test and generate read it as it is)")
    if ckpt_path is not None and not ckpt_path.is_dir() and cfg.trainer.strategy == "fsdp":
        raise UserError(f"'{ckpt_path}' is a single-file checkpoint; trainer.strategy=fsdp resumes only the sharded "
                        f"checkpoints it writes: resume it with the strategy that wrote it (auto, ddp or ddp_spawn)")
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    dm, module, tok = build_data_and_module(cfg, tokenizer_json)
    if ckpt is not None:
        from mtp_lightning.checkpoints.io import load_module_checkpoint

        load_module_checkpoint(module, ckpt, ckpt_path)  # an architecture change is refused up front
        del ckpt
    paths = RunPaths(run_dir)
    if not is_launched_child():
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        write_text(paths.config, to_yaml(cfg))
        write_text(paths.tokenizer, tok.to_json())
    trainer = build_trainer(cfg, paths, cfg.model.heads.n_future, quiet)
    from mtp_lightning.training.summary import preamble_lines, summary_lines

    if not quiet and not is_launched_child():
        print("\n".join(preamble_lines(cfg, dm, module.model, resolve_precision(cfg), run_dir, ckpt_path)),
              flush=True)
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
    from mtp_lightning.callbacks.safety import GracefulStopCallback

    stop = next(c for c in trainer.callbacks if isinstance(c, GracefulStopCallback))
    if not quiet and trainer.is_global_zero and stop.received is None:
        print("\n".join(summary_lines(cfg, trainer, dm, run_dir)), flush=True)
    return run_dir, stop


def evaluate(stage: str, files: list[str], overrides: list[str], ckpt: str | None) -> list[dict]:
    """``validate`` or ``test`` a checkpoint (default: the run's last) on its corpus' held-out split."""
    if ckpt is None:
        cfg = load_config(files, overrides)
        ckpt = str(find_resume_checkpoint(Path(cfg.run.root) / cfg.run.name))
    loaded = safe_load(ckpt)
    cfg = load_config(files, overrides, base=loaded[META_KEY]["config"])
    cfg.trainer.strategy, cfg.trainer.devices = "auto", 1
    check_devices(cfg)
    dm, module, _ = build_data_and_module(cfg, loaded[META_KEY]["tokenizer"])
    from mtp_lightning.checkpoints.io import load_module_checkpoint

    load_module_checkpoint(module, loaded, ckpt)
    trainer = build_trainer(cfg, None, cfg.model.heads.n_future)
    run = trainer.validate if stage == "validate" else trainer.test
    return run(module, datamodule=dm, verbose=False)
