"""The Lightning shell around ``CPModel`` and ``cp_objective``: optimisation, logging, checkpoints.

The maths lives in ``model/`` and ``cp_loss.py``; this file only wires it to Lightning. Logged values
are tensors (no host syncs in the training step), namespaced ``train/``, ``val/`` and ``test/``.
The checkpoint carries the resolved config and the tokenizer, so a checkpoint alone is enough to
decode, and loading one never needs to unpickle objects (see ``checkpoint_io.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import lightning as L
import torch
from torchmetrics import SumMetric
from torchmetrics.text import Perplexity

from mtp_lightning.config import Config, OptimConfig
from mtp_lightning.objectives.cp_loss import cp_objective, mixture_health
from mtp_lightning.objectives.heldout import bits_per_byte
from mtp_lightning.data.packing import split_window
from mtp_lightning.checkpoints.rng import rng_states, set_rng_states
from mtp_lightning.errors import UserError
from mtp_lightning.model.cp_model import CPModel


class NonFiniteLoss(UserError):
    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"the loss is NaN or infinite at step {step}; no weights were updated with it and no "
                         f"checkpoint was written after it. Last good checkpoint: {checkpoint}. Resume from it "
                         f"with a lower optim.lr, or set trainer.on_nonfinite=skip to skip such batches")


class CPLightningModule(L.LightningModule):
    def __init__(self, cfg: Config, token_bytes: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.model = CPModel(cfg.model)
        # bytes each token id stands for: bits per byte compares models across tokenizers
        self.register_buffer("token_bytes", token_bytes.float(), persistent=False)  # (V,)
        self.stage_metrics = torch.nn.ModuleDict({
            stage: torch.nn.ModuleDict({"ppl": Perplexity(), "nats": SumMetric(), "bytes": SumMetric(),
                                        "verifier_nats": SumMetric()})
            for stage in ("val", "test")
        })
        self.last_expert_choice: torch.Tensor | None = None  # read by the mixture-health callback
        self.nonfinite_skips = 0
        self._model_prepared = False
        self._extra_logs: dict[str, torch.Tensor] = {}  # terms beyond cp_objective, for _log_terms
        self._draft_pool: torch.Tensor | None = None  # draft tuning's continuations, made on first use
        # distillation in joint mode needs the base model as it was: a frozen copy, kept out of the
        # module tree (never saved, never optimised; moved to the device on first use)
        self._teacher: list[torch.nn.Module] = []
        if cfg.model.loss.distill_weight > 0 and not self.model.backbone_frozen:
            import copy

            teacher = copy.deepcopy(self.model.trunk)
            teacher.frozen = True
            self._teacher.append(teacher.requires_grad_(False).eval())

    def configure_model(self) -> None:
        """Activation checkpointing, compile and (under ``trainer.strategy=fsdp``) FSDP2 sharding of each
        block; see ``distributed.py``. Lightning calls this for every strategy, once per fit/validate."""
        if self._model_prepared:
            return
        from mtp_lightning.training.distributed import prepare_model

        prepare_model(self.model, self.cfg.model, self.device_mesh)
        self._model_prepared = True

    def on_fit_start(self) -> None:
        """With ``model.backbone.cache_states``: the frozen backbone's hidden states for the windows this
        run trains and validates on, from the cache or built now (``data/hidden_cache.py``)."""
        if not self.cfg.model.backbone.cache_states:
            return
        trainer, trunk = self.trainer, self.model.trunk
        precision = trainer.precision_plugin

        def encode(inputs: torch.Tensor) -> torch.Tensor:
            # the same precision context as the training step's forward, so the states are the ones it
            # would compute
            with torch.no_grad(), precision.forward_context():
                return trunk(inputs.to(self.device))  # (k, T, D)

        t = self.cfg.trainer
        batches = t.max_steps * trainer.accumulate_grad_batches * trainer.world_size if t.max_steps > 0 else 0
        key = f"{trunk.fingerprint()}|{trainer.precision}"
        trainer.datamodule.cache_hidden_states(key, encode, batches, t.limit_val_batches, report=self.print)

    # ---- steps ----------------------------------------------------------------------------------

    def _terms(self, batch):
        """The objective's terms for a batch: windows (B, T + n), or (windows, z (B, T, D)) with the frozen
        backbone's cached hidden states (``data/hidden_cache.py``), which then stand in for its forward."""
        n = self.model.n_future
        window, cached = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        inputs, targets = split_window(window, n)  # (B, T), (B, T, n)
        if cached is None:
            z, states = self.model(inputs)  # (B, T, D), n x (B, T, D)
        else:
            z = cached
            states = self.model.heads.offset_states(z)
        loss_cfg = self.cfg.model.loss
        if not self.training and loss_cfg.position_fraction < 1.0:
            # evaluation sees every position: exact metrics, and no draws from the training RNG
            loss_cfg = dataclasses.replace(loss_cfg, position_fraction=1.0)
        model = self.model
        # the heads' vocabulary: the full one, or the draft vocabulary's V' ids and "other" (draft_vocab.py)
        classes = model.head_targets(targets)  # (B, T, n)
        U = model.head_unembedding(other=True)
        self._extra_logs = {}
        if model.draft_vocab:
            self._extra_logs["draft_vocab_coverage"] = (classes < model.draft_vocab).float().mean()
        distill = self._distill(inputs, classes, z, states, U, loss_cfg)
        # the distillation's products also give the CP objective its factors: computed once for both
        factors = distill.factors if distill is not None and loss_cfg.position_fraction == 1.0 else None
        terms = cp_objective(model.heads, z, states, U, classes, loss_cfg, lm_U=model.unembedding,
                             lm_targets=targets, frozen_rows=model.head_frozen_rows, factors=factors)
        terms = self._add_extra_terms(terms, distill)
        return inputs, targets, window, z, states, terms

    def _distill(self, inputs, classes, z, states, U, loss_cfg):
        """The per-offset distillation to the base model (docs/method.md, "Distillation to a frozen base
        model"), or None when ``model.loss.distill_weight`` is 0; ``classes`` (B, T, n) are the targets
        in the heads' vocabulary (``CPModel.head_targets``)."""
        if self.cfg.model.loss.distill_weight <= 0:
            return None
        from mtp_lightning.objectives.distill import distill_objective

        model = self.model
        if self._teacher:  # joint mode: the base model as it was before training
            teacher = self._teacher[0].to(z.device)
            with torch.no_grad():
                base_z = teacher(inputs)  # (B, T, D)
            base_logits = teacher.lm_logits
        else:  # heads only: the frozen trunk is the base model, and z is its output
            base_z, base_logits = z.detach(), model.lm_logits
        if model.draft_vocab:  # the base model's logits at the V' ids only
            base_logits = functools.partial(base_logits, rows=model.heads.draft_ids)
        return distill_objective(model.heads, z, states, U, base_z, base_logits, classes, loss_cfg,
                                 kl_cols=model.draft_vocab, frozen_rows=model.head_frozen_rows)

    def _add_extra_terms(self, terms, distill):
        """The joint term's weight and the distillation's (docs/method.md, "Training objective")."""
        lc = self.cfg.model.loss
        loss = terms.loss
        if lc.joint_weight != 1.0:
            loss = loss + (lc.joint_weight - 1.0) * terms.joint_nll  # cp_objective weighs it 1
        if distill is not None:
            loss = loss + lc.distill_weight * distill.loss
            self._extra_logs.update({"distill_loss": distill.loss, "distill_kl_offset1": distill.kl[0],
                                     "distill_kl": distill.kl.mean(), "distill_ce": distill.ce.mean()})
        return dataclasses.replace(terms, loss=loss) if loss is not terms.loss else terms

    def _log_terms(self, stage: str, terms, batch_size: int) -> None:
        n = self.model.n_future
        on_step = stage == "train"
        logs = {
            f"{stage}/joint_nll_per_token": terms.joint_nll / n,
            f"{stage}/joint_nll": terms.joint_nll,
            f"{stage}/next_token_nll": terms.offset_nll[0],
            f"{stage}/balance_loss": terms.balance,
        }
        for s in range(n):
            logs[f"{stage}/offset{s + 1}_nll"] = terms.offset_nll[s]
        if terms.lm_head_nll is not None:
            logs[f"{stage}/lm_head_nll"] = terms.lm_head_nll
        for key, value in self._extra_logs.items():
            logs[f"{stage}/{key}"] = value
        health = mixture_health(terms.log_w, terms.posterior)
        for key in ("router_entropy", "dead_experts", "busiest_share"):
            logs[f"{stage}/{key}"] = health[key]
        for a in range(self.model.rank):
            logs[f"{stage}/expert{a}_weight"] = health["expert_weight"][a]
            logs[f"{stage}/expert{a}_wins"] = health["expert_wins"][a]
        self.log_dict(logs, on_step=on_step, on_epoch=not on_step, batch_size=batch_size,
                      sync_dist=not on_step)
        self.log(f"{stage}/loss", terms.loss, on_step=on_step, on_epoch=not on_step, prog_bar=True,
                 batch_size=batch_size, sync_dist=not on_step)
        if stage == "train":
            self.last_expert_choice = terms.log_w.argmax(-1)  # (N,)

    @property
    def draft_tuning(self) -> bool:
        """True once ``trainer.max_steps`` are done and ``draft_tuning.steps`` follow (see draft_tuning.py)."""
        return self.cfg.draft_tuning.steps > 0 and self.global_step >= self.cfg.trainer.max_steps

    def _draft_step(self) -> torch.Tensor:
        """One draft-tuning step. The data loader's window is not used: the batch comes from the pool of
        the model's own continuations, chosen by the step number alone (so a resume draws the same)."""
        from mtp_lightning.objectives.draft_tuning import draft_objective, pool_batch, soft_terms, verifier_targets

        dt, n = self.cfg.draft_tuning, self.model.n_future
        if self._draft_pool is None:
            self._draft_pool = self._make_draft_pool()
        rows = pool_batch(self._draft_pool, self.global_step, self.cfg.run.seed, dt.batch_size,
                          self.global_rank, self.trainer.world_size).to(self.device)  # (B, P + G)
        inputs, targets = split_window(rows, n)  # (B, T), (B, T, n)
        z, states = self.model(inputs, frozen_trunk=True)  # (B, T, D)
        U, classes = self.model.head_unembedding(other=True), self.model.head_targets(targets)
        # position t's first target is token t + 1: from t = P - 1 on, every target was generated
        first, batch = dt.prompt_len - 1, rows.shape[0]
        if dt.soft_weight > 0:
            target_lp = verifier_targets(self.model, z, states, self.cfg.spec.verifier)  # (B, T, K)
            terms = soft_terms(self.model.heads, z, states, U, classes, first, self.cfg.model.loss, target_lp,
                               dt.soft_weight, kl_cols=self.model.draft_vocab)
            loss, nll = terms.loss, terms.ce.sum()
            self.log("train/draft_kl_per_token", terms.kl.mean(), batch_size=batch)
        else:
            loss = nll = draft_objective(self.model.heads, z, states, U, classes, first, self.cfg.model.loss)
        # its own curve: train/loss stays the main objective's
        self.log("train/draft_nll_per_token", nll / (n - 1), prog_bar=True, batch_size=batch)
        return loss

    def _make_draft_pool(self) -> torch.Tensor:
        """Continuations of ``draft_tuning.sequences`` training-split prompts, greedy or sampled at
        ``draft_tuning.temperature``. The verifier is frozen from here on and the draws are seeded, so
        a resumed run rebuilds the very same pool."""
        from torch.distributed.fsdp import FSDPModule

        from mtp_lightning.decoding.sampling import Sampling
        from mtp_lightning.objectives.draft_tuning import mixed_pool

        dt = self.cfg.draft_tuning
        prompts = self.trainer.datamodule.val_prompts(dt.sequences, dt.prompt_len, split="train").to(self.device)
        # self.print: rank zero only, and above the progress bar
        sampled = round(dt.sequences * dt.sampled_fraction) if dt.temperature > 0 else 0
        how = {0: "greedily", dt.sequences: f"samples at temperature {dt.temperature:g}"}.get(
            sampled, f"{sampled} sampled at temperature {dt.temperature:g}, the rest greedily")
        if dt.soft_weight > 0:
            how += f"; soft targets, weight {dt.soft_weight:g}"
        self.print(f"draft tuning: the model continues {dt.sequences} training prompts by {dt.new_tokens} "
                   f"tokens ({how}), then trains offsets 2..{self.model.n_future} on them for {dt.steps} steps")
        shown = [0]  # eighths of the pool reported so far

        def report(done: int) -> None:
            eighths = 8 * done // dt.sequences
            if eighths > shown[0]:
                shown[0] = eighths
                self.print(f"draft tuning: {done}/{dt.sequences} continuations")

        sharded = isinstance(self.model, FSDPModule)
        if sharded:
            # a resumed run has not run the root's forward yet, and FSDP2 sets up its units there: a
            # decoding call first would set up the first block as a root of its own. The root's forward
            # also gathers the weights decoding reads directly (embeddings, heads).
            with torch.no_grad():
                self.model(prompts[:1, :2])
            self.model.unshard()
        try:
            # the same seed on every rank: the ranks' pools must be one pool, sliced by pool_batch
            generator = torch.Generator(device=self.device).manual_seed(self.cfg.run.seed)
            return mixed_pool(self.model, prompts, dt.new_tokens, self.cfg.spec.verifier, sampled,
                              Sampling(temperature=dt.temperature), generator, on_batch=report,
                              inference_mode=not sharded)
        finally:
            if sharded:
                self.model.reshard()

    def training_step(self, batch, batch_idx: int):
        if self.draft_tuning:
            return self._draft_step()
        _, _, window, _, _, terms = self._terms(batch)
        finite = bool(torch.isfinite(terms.loss))
        if self.trainer.world_size > 1:
            # decided by every rank alike, or one rank skipping/stopping would leave the others waiting
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            if self.cfg.trainer.on_nonfinite == "skip":
                self.nonfinite_skips += 1
                self.log("train/nonfinite_skips", float(self.nonfinite_skips))
                return None  # Lightning skips the backward and the optimizer step
            raise NonFiniteLoss(self.global_step, self._last_checkpoint())
        self._log_terms("train", terms, window.shape[0])
        return terms.loss

    def _last_checkpoint(self) -> str:
        for cb in self.trainer.checkpoint_callbacks:
            path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
            if path:
                return path
        return "none yet"

    def _eval_step(self, stage: str, batch) -> torch.Tensor:
        inputs, targets, window, z, states, terms = self._terms(batch)
        self._log_terms(stage, terms, window.shape[0])
        m = self.stage_metrics[stage]
        m["nats"].update(terms.token_nll.sum())
        m["bytes"].update(self.token_bytes[targets[..., 0]].sum())
        if self.cfg.spec.verifier == "lm_head":
            # the distribution decoding emits from: the plain LM head (a pretrained model's own output
            # layer), over the whole vocabulary; the heads' offset-1 figures above are over their classes
            with torch.no_grad():
                for b in range(window.shape[0]):
                    lp = self.model.verifier_logprobs(z[b], [], "lm_head")  # (T, V)
                    m["verifier_nats"].update(-lp.gather(-1, targets[b, :, :1]).sum())
        if self.model.draft_vocab:
            return terms.loss  # no full-vocabulary marginal to take a perplexity of (its NLLs are logged)
        # torchmetrics' Perplexity takes logits: the marginal's log-probs are logits of the marginal
        with torch.no_grad():
            for b in range(window.shape[0]):
                lp = self.model.verifier_logprobs(z[b:b + 1], [u[b:b + 1] for u in states], "marginal")
                m["ppl"].update(lp, targets[b:b + 1, :, 0])  # (1, T, V)
        return terms.loss

    def validation_step(self, batch, batch_idx: int):
        return self._eval_step("val", batch)

    def test_step(self, batch, batch_idx: int):
        return self._eval_step("test", batch)

    def _eval_epoch_end(self, stage: str) -> None:
        m = self.stage_metrics[stage]
        if m["bytes"].update_count == 0:
            return
        bpb = bits_per_byte(m["nats"].compute(), m["bytes"].compute())
        self.log(f"{stage}/bits_per_byte", bpb, sync_dist=False)  # already reduced by torchmetrics
        if m["verifier_nats"].update_count:
            self.log(f"{stage}/verifier_bits_per_byte", bits_per_byte(m["verifier_nats"].compute(),
                                                                      m["bytes"].compute()), sync_dist=False)
        if m["ppl"].update_count:
            self.log(f"{stage}/ppl", m["ppl"].compute(), sync_dist=False)
        for metric in m.values():
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ---- optimisation ---------------------------------------------------------------------------

    def configure_optimizers(self):
        o: OptimConfig = self.cfg.optim
        head_lr = o.head_lr or o.lr
        groups: dict[tuple[float, float], list] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # weight decay on matrices only; norms, biases and the router stay undecayed
            decay = o.weight_decay if (p.ndim >= 2 and "router" not in name) else 0.0
            lr = head_lr if name.startswith("heads.") else o.lr
            groups.setdefault((lr, decay), []).append(p)
        param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
        # no fused AdamW: Lightning's mixed-precision plugin refuses to clip the gradients of an
        # optimizer that unscales them itself (found on an H200 with bf16-mixed and grad_clip > 0)
        opt = torch.optim.AdamW(param_groups, betas=(o.beta1, o.beta2))
        total, warm, floor = self.cfg.trainer.max_steps, o.warmup_steps, o.min_lr_ratio
        draft_scale = self.cfg.draft_tuning.lr / head_lr  # only the draft maps get gradients then

        def schedule(step: int) -> float:
            if step >= total:
                return draft_scale
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoint contents --------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from mtp_lightning.checkpoints.io import add_run_metadata

        add_run_metadata(checkpoint, self.cfg, self.trainer.datamodule.tokenizer)
        checkpoint["rng_states"] = rng_states()
        if self.model.backbone_frozen:
            from mtp_lightning.checkpoints.io import omit_frozen_backbone

            omit_frozen_backbone(checkpoint, self.model.trunk)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
        if "state_dict" not in checkpoint:  # sharded (fsdp): the strategy has loaded the weights itself
            return
        from mtp_lightning.checkpoints.io import restore_frozen_backbone

        # Lightning loads the state dict strictly after this hook: give it the base model's weights
        checkpoint["state_dict"] = restore_frozen_backbone(checkpoint, self.model.trunk, "checkpoint")
