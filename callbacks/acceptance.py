"""Measure self-speculative acceptance during training, so checkpoints can be chosen by it.

At the end of the first validation and every ``every_n_val``-th after it (sanity checks skipped), the
callback decodes fixed held-out prompts, ``trainer.datamodule.val_prompts(n_prompts, prompt_len)``,
with real greedy speculative decoding (and sampled decoding with a fixed seed when asked), and logs
``spec/acceptance_rate``, ``spec/mean_acceptance_length`` and ``spec/acceptance_rate_pos{j}`` through
``pl_module.log`` in ``on_validation_epoch_end``, so ``ModelCheckpoint(monitor=
"spec/mean_acceptance_length", mode="max")`` sees them. It also logs the teacher-forced estimate
``spec/tf_mean_acceptance_length`` / ``spec/tf_acceptance_rate`` on the first validation batch.
With ``stop_at_eos`` a prompt's decoding ends at the datamodule tokenizer's end-of-text token, as
``generate`` and ``bench`` end theirs.
With ``spec.tree.enabled`` the measurements verify trees (``decoding/tree.py``), one prompt at a time:
the greedy one logs ``spec/tree_mean_size`` and a TensorBoard histogram ``spec/tree_winner`` of which
candidate won each step (-1 none, 0 the mixture chain, 1 + a expert a's chain, r + 1 a top-k branch);
the sampled one (``sampled``) verifies sampled trees, exact as the chain's sampling is, and logs
``spec/sampled_tree_mean_size`` and ``spec/sampled_tree_winner`` (0 the main chain, e the e-th extra
chain, r + 1 a branch).

At the end of the run the callback also times the decoders, as ``python -m mtp_lightning bench`` does
(``decoding/bench.py``'s ``run_benchmark``, one warm-up, one repeat): batch 1, the same held-out
prompts, KV-cached greedy AR decoding against greedy speculative decoding (tree verification with
``spec.tree.enabled``), the same ``max_new_tokens`` and end-of-text rule. It logs
``spec/ar_tokens_per_s``, ``spec/spec_tokens_per_s``, ``spec/speedup`` (their ratio) and
``spec/identical`` (1 when both gave the same tokens), so ``fit``'s summary can print the speedup of the
final weights. "The end" is the validation after ``trainer.max_steps`` optimizer steps (the Trainer's
``max_steps``, draft-tuning steps included); acceptance is measured there too even when ``every_n_val``
would skip it, so tau and the speedup describe the same weights. A run whose last step is not followed
by a validation (``max_steps`` not a multiple of the validation interval) is measured in
``on_train_end`` instead, where ``pl_module.log`` is not allowed: the scalars go straight into
``trainer.callback_metrics`` and the loggers, at the step a validation there would have used. Earlier
validations are never timed (decoding twice more costs time), nor is a run stopped early. A warning
repeats what ``bench``'s ``timing_warnings`` find doubtful (a loaded machine, a speedup beyond tau).
``time_speedup=False`` turns the timing off.

Distributed runs: every rank decodes the same prompts (the counts are summed across ranks, which
leaves the rates unchanged). Speculative steps can still differ between ranks (kernels are not
bit-identical across devices), so the decoder gets a ``sync_done`` hook: each step all-reduces a
"done" flag and drafts the full draft_len, so every rank runs the same number of passes with the same
shapes. That is what collectives inside a forward (FSDP's all-gathers) need; the decoding calls of
``CPModel`` must still see full parameters under FSDP, which has not been tested here. The speedup is not
timed with more than one process (ranks sharing the machine would time each other, and one rank
decoding alone would leave FSDP's collectives unmatched); a warning says so and ``bench`` measures it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from mtp_lightning.config import SpecConfig, TreeConfig
from mtp_lightning.decoding.bench import machine_load, run_benchmark, timing_warnings
from mtp_lightning.decoding.metrics import SpecAcceptance
from mtp_lightning.decoding.sampling import Sampling
from mtp_lightning.decoding.speculative import generate_speculative, resolve_draft_len
from mtp_lightning.decoding.teacher_forced import teacher_forced_acceptance
from mtp_lightning.decoding.tree import tree_depth, tree_summary


class SpecAcceptanceCallback(pl.Callback):
    def __init__(self, every_n_val: int = 1, n_prompts: int = 4, prompt_len: int = 64, max_new_tokens: int = 64,
                 draft_len: int = 0, sampled: bool = False, verifier: str = "marginal", seed: int = 0,
                 draft_precision: str = "auto", stop_at_eos: bool = True,
                 tree: TreeConfig | None = None, time_speedup: bool = True):
        if every_n_val < 0 or n_prompts < 1 or prompt_len < 1 or max_new_tokens < 1:
            raise ValueError(f"SpecAcceptanceCallback needs every_n_val >= 0 and n_prompts, prompt_len, "
                             f"max_new_tokens >= 1; got {every_n_val}, {n_prompts}, {prompt_len}, "
                             f"{max_new_tokens}")
        self.every_n_val, self.n_prompts, self.prompt_len = every_n_val, n_prompts, prompt_len
        self.max_new_tokens, self.draft_len, self.sampled = max_new_tokens, draft_len, sampled
        self.verifier, self.seed, self.draft_precision = verifier, seed, draft_precision
        self.stop_at_eos, self.time_speedup = stop_at_eos, time_speedup
        self.tree = tree if tree is not None and tree.enabled else None
        self._validations = 0  # real (not sanity) validations seen; saved in checkpoints
        self._windows: torch.Tensor | None = None
        self._timed = False  # the end of this fit was timed (at its last validation)
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, spec: SpecConfig) -> "SpecAcceptanceCallback":
        return cls(every_n_val=spec.every_n_val, n_prompts=spec.n_prompts, prompt_len=spec.prompt_len,
                   max_new_tokens=spec.max_new_tokens, draft_len=spec.draft_len, sampled=spec.sampled,
                   verifier=spec.verifier, draft_precision=spec.draft_precision, stop_at_eos=spec.stop_at_eos,
                   tree=spec.tree, time_speedup=spec.time_speedup)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = getattr(pl_module, "model", None)
        if model is None or self.every_n_val == 0:
            return
        k = resolve_draft_len(model, self.draft_len)
        if self.tree is not None:  # the tree's nodes; a chain decodes beside it in the timing
            k = max(k, self.tree.budget) if self.time_speedup else self.tree.budget
        # prompts are one batch of equal length; a batch keeps draft_len spare cache slots
        need = self.prompt_len + self.max_new_tokens - 1 + k
        if need > model.max_seq_len:
            raise ValueError(f"spec.prompt_len={self.prompt_len} + spec.max_new_tokens={self.max_new_tokens} "
                             f"+ draft_len={k} - 1 = {need} exceeds model.gpt.max_seq_len={model.max_seq_len}; "
                             f"lower spec.prompt_len or spec.max_new_tokens")

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            elif isinstance(batch, dict):
                batch = batch.get("window")
            if isinstance(batch, torch.Tensor) and batch.dim() == 2:
                self._windows = batch
            else:
                self._warn_once("windows", "SpecAcceptanceCallback: the first validation batch is not a "
                                "(B, T + n_future) LongTensor (nor its first element, nor batch['window']); "
                                "spec/tf_* metrics are skipped")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._timed = False

    def _at_end(self, trainer: pl.Trainer) -> bool:
        """True once the Trainer's last optimizer step is done (its ``max_steps``, which ``fit`` sets to
        ``trainer.max_steps + draft_tuning.steps``), in a fit."""
        return (trainer.state.fn == TrainerFn.FITTING and trainer.max_steps > 0
                and trainer.global_step >= trainer.max_steps)

    def _should_time(self, trainer: pl.Trainer) -> bool:
        if not self.time_speedup:
            return False
        if trainer.world_size > 1:
            self._warn_once("timing", f"SpecAcceptanceCallback: the speedup over AR decoding is not timed with "
                            f"{trainer.world_size} processes; measure it with `python -m mtp_lightning bench "
                            f"--ckpt <last.ckpt>`")
            return False
        return True

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_val == 0:
            return
        self._validations += 1
        last = self._at_end(trainer)
        if (self._validations - 1) % self.every_n_val and not last:
            return
        windows, self._windows = self._windows, None
        timed = last and self._should_time(trainer)
        scalars, histograms, k = self._measure_all(trainer, pl_module, windows, timed)
        self._timed = self._timed or timed
        for key, value in scalars.items():
            pl_module.log(key, value, sync_dist=True)
        self._tensorboard(trainer, k, scalars, histograms)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The end-of-run measurement of a fit whose last step was not followed by a validation."""
        if self.every_n_val == 0 or self._timed or not self._at_end(trainer) or not self._should_time(trainer):
            return
        scalars, histograms, k = self._measure_all(trainer, pl_module, None, True)
        self._timed = True
        # pl_module.log is refused in this hook: what it would do for one process, by hand, at the
        # step Lightning gives a validation after the last optimizer step (its 0-based index)
        trainer.callback_metrics.update(scalars)
        for logger in trainer.loggers:
            logger.log_metrics({key: float(v) for key, v in scalars.items()}, step=trainer.global_step - 1)
        self._tensorboard(trainer, k, scalars, histograms)

    def _measure_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule, windows: torch.Tensor | None,
                     timed: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """``_measure``'s scalars and histograms, with the timing's scalars when ``timed``, and the draft length."""
        model = pl_module.model
        k = resolve_draft_len(model, self.draft_len)
        prompts = self._prompts(trainer)
        was_training = model.training
        model.eval()
        try:
            scalars, histograms = self._measure(trainer, model, k, prompts, windows)
            if timed and prompts is not None:
                scalars.update(self._time(trainer, model, prompts))
        finally:
            model.train(was_training)
        return scalars, histograms, k

    def _time(self, trainer: pl.Trainer, model, prompts: torch.Tensor) -> dict[str, torch.Tensor]:
        """AR against speculative decoding at batch 1, timed by ``run_benchmark`` (one process only).

        float64 CPU tensors: Lightning keeps float64 as it is, so the logged speedup is exactly the
        logged speculative rate over the logged AR rate."""
        load, cores = machine_load()
        result = run_benchmark(model, prompts.tolist(), self.max_new_tokens, batch_size=1, verifier=self.verifier,
                               draft_len=self.draft_len, draft_precision=self.draft_precision,
                               eos_id=self._eos_id(trainer), repeats=1, tree=self.tree)
        if self.tree is None:
            spec_tps, identical = result["spec_tokens_per_s"], result["identical"]
        else:  # the tree's columns; its tokens are compared with the same AR rows
            spec_tps, identical = result["tree_tokens_per_s"], result["identical"] and result["tree_identical"]
        ar_tps = result["ar_tokens_per_s"]
        values = {"spec/ar_tokens_per_s": ar_tps, "spec/spec_tokens_per_s": spec_tps,
                  "spec/speedup": spec_tps / ar_tps, "spec/identical": float(identical)}
        tau = result["mean_acceptance_length" if self.tree is None else "tree_mean_acceptance_length"]
        for warning in timing_warnings(result["ar_seconds"], result["spec_seconds"], values["spec/speedup"], tau,
                                       load, cores):
            rank_zero_warn(f"SpecAcceptanceCallback: spec/speedup is doubtful: {warning}")
        return {key: torch.tensor(v, dtype=torch.float64) for key, v in values.items()}

    def _eos_id(self, trainer: pl.Trainer) -> int | None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        return tokenizer.eot_id if self.stop_at_eos and tokenizer is not None else None

    def _prompts(self, trainer: pl.Trainer) -> torch.Tensor | None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "val_prompts"):
            self._warn_once("prompts", "SpecAcceptanceCallback: the datamodule defines no "
                            "`val_prompts(n_prompts, prompt_len) -> LongTensor (n, prompt_len)`; real "
                            "speculative decoding (spec/acceptance_rate, spec/mean_acceptance_length) "
                            "is skipped")
            return None
        return dm.val_prompts(self.n_prompts, self.prompt_len)

    def _measure(self, trainer: pl.Trainer, model, k: int, prompts: torch.Tensor | None,
                 windows: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Scalars to log by name, and the acceptance histograms (k+1,) by prefix."""
        device = model.unembedding.device
        sync_done = None
        if trainer.world_size > 1:
            def sync_done(local_done: bool) -> bool:
                left = torch.tensor(0.0 if local_done else 1.0, device=device)
                return bool(trainer.strategy.reduce(left, reduce_op="sum") == 0)

        eos_id = self._eos_id(trainer)
        runs = [("spec/", None)] if prompts is not None else []
        if prompts is not None and self.sampled:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            runs.append(("spec/sampled_", gen))
        out: dict[str, torch.Tensor] = {}
        histograms: dict[str, torch.Tensor] = {}
        tree = self.tree
        if tree is not None and sync_done is not None:
            self._warn_once("tree", "SpecAcceptanceCallback: spec.tree runs on one process; with "
                            f"{trainer.world_size} ranks the measurements verify chains")
            tree = None
        for prefix, gen in runs:
            sampling = Sampling(1.0) if gen is not None else Sampling()
            if tree is not None:
                # trees decode one row at a time; the tree's depth is its draft length
                kt = tree_depth(model, k, tree)
                metric = SpecAcceptance(kt).to(device)
                with torch.inference_mode():
                    rows = [generate_speculative(model, p[None], self.max_new_tokens, verifier=self.verifier,
                                                 draft_len=kt, sampling=sampling, generator=gen,
                                                 draft_precision=self.draft_precision, eos_id=eos_id, tree=tree)
                            for p in prompts]
                for result in rows:
                    metric.update(*result.step_counts())
                summary = tree_summary(rows)
                out[f"{prefix}tree_mean_size"] = torch.tensor(summary["mean_size"])
                histograms[f"{prefix}tree_winner"] = torch.tensor(list(summary["winners"].values()))
            else:
                metric = SpecAcceptance(k).to(device)
                with torch.inference_mode():
                    result = generate_speculative(model, prompts, self.max_new_tokens, verifier=self.verifier,
                                                  draft_len=k, sampling=sampling, generator=gen,
                                                  sync_done=sync_done, draft_precision=self.draft_precision,
                                                  eos_id=eos_id)
                metric.update(*result.step_counts())
            stats = metric.summary()  # sums across ranks
            out[f"{prefix}acceptance_rate"] = stats["acceptance_rate"]
            out[f"{prefix}mean_acceptance_length"] = stats["mean_acceptance_length"]
            for j, rate in enumerate(stats["per_position"], start=1):
                out[f"{prefix}acceptance_rate_pos{j}"] = rate
            histograms[prefix] = stats["histogram"]
        if windows is not None:
            tf = teacher_forced_acceptance(model, windows, k, self.verifier)
            out["spec/tf_mean_acceptance_length"] = tf["mean_acceptance_length"]
            out["spec/tf_acceptance_rate"] = tf["acceptance_rate"]
        return out, histograms

    def _tensorboard(self, trainer: pl.Trainer, k: int, scalars: dict[str, torch.Tensor],
                     histograms: dict[str, torch.Tensor]) -> None:
        """Histogram and per-position rates as TensorBoard plots; pure logging, rank zero only."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            for prefix, hist in histograms.items():
                if int(hist.sum()) == 0:
                    continue
                if prefix.endswith("tree_winner"):  # -1: no draft accepted, 0: the main chain, then ``source_names``
                    ids = torch.arange(-1, hist.numel() - 1)
                    logger.experiment.add_histogram(prefix, torch.repeat_interleave(ids, hist.cpu()).float(),
                                                    trainer.global_step, bins=np.arange(-1, hist.numel()) - 0.5)
                    continue
                k = hist.numel() - 1  # a tree's depth may differ from the chain's draft length
                values = torch.repeat_interleave(torch.arange(k + 1), hist.cpu()).float()  # one value per step
                logger.experiment.add_histogram(f"{prefix}accepted_per_step", values, trainer.global_step,
                                                bins=np.arange(k + 2) - 0.5)
                logger.experiment.add_scalars(f"{prefix}acceptance_rate_per_position",
                                              {f"pos{j}": float(scalars[f"{prefix}acceptance_rate_pos{j}"])
                                               for j in range(1, k + 1)}, trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = state_dict.get("validations", 0)
