"""What ``fit`` tells the user: a preamble before the progress bar, and a summary once training ends.

Both are lists of lines built from what the run already holds (the config, the prepared corpus, the
model, the Trainer's last logged metrics), so printing them costs nothing but the gzip baseline, which
the datamodule computes once per cached corpus.
"""

from __future__ import annotations

from pathlib import Path

from mtp_lightning.config import Config


def _model_line(cfg: Config, model) -> str:
    h = cfg.model.heads
    if cfg.model.backbone.kind == "hf":
        trunk = f"{cfg.model.backbone.name_or_path} ({cfg.model.backbone.train_mode})"
    else:
        g = cfg.model.gpt
        trunk = f"GPT {g.n_layer} layers x d_model {g.d_model}, {g.n_head} heads, context {g.max_seq_len}"
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = "all trainable" if trainable == total else f"{trainable:,} trainable"
    return (f"model: {trunk}; CP heads n_future={h.n_future} rank={h.rank} kind={h.kind}; "
            f"{total:,} parameters ({share})")


def preamble_lines(cfg: Config, dm, model, precision: tuple[str, str], run_dir: Path, resumed_from=None
                   ) -> list[str]:
    """The corpus, the tokenizer, the model, the steps, the precision (and why) and the run folder."""
    stats = dm.stats
    b, t = stats["bytes"], stats["tokens"]
    d, tr, tok = cfg.data, cfg.trainer, dm.tokenizer
    steps = f"steps: {tr.max_steps:,} of batch {d.batch_size} x {d.seq_len} tokens, validation every " \
            f"{tr.val_check_interval}, checkpoint every {cfg.checkpoint.every_n_steps}"
    if cfg.draft_tuning.steps:
        steps += f", then {cfg.draft_tuning.steps:,} draft-tuning steps"
    lines = [
        f"corpus: {dm.source} ({d.kind}): {b['train']:,} train bytes ({t['train']:,} tokens), "
        f"{b['val']:,} held-out bytes ({t['val']:,} tokens)",
        f"tokenizer: {dm.tokenizer_origin}; {tok.vocab_size:,} tokens",
        _model_line(cfg, model),
        steps,
        f"precision: {precision[0]} ({precision[1]})",
        f"run: {run_dir}" + (f", resumed from {resumed_from}" if resumed_from else ""),
    ]
    return lines


def _checkpoint_paths(trainer) -> tuple[str, str]:
    best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor and c.best_model_path), "")
    last = next((c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path), "")
    return best, last


def _acceptance_lines(cfg: Config, metrics, last, world_size: int) -> list[str]:
    """tau and, when the acceptance callback timed the decoders at the end of the run
    (``spec.time_speedup``), the speedup over AR decoding; else the command that measures it."""
    sp = cfg.spec
    if "spec/speedup" in metrics:
        tree = "tree verification, " if sp.tree.enabled else ""
        same = "outputs identical" if float(metrics["spec/identical"]) == 1 else "outputs DIFFER from AR"
        return [f"acceptance at the end of training: tau {float(metrics['spec/mean_acceptance_length']):.2f} tokens "
                f"per step, acceptance rate {float(metrics['spec/acceptance_rate']):.3f} (greedy, {sp.n_prompts} "
                f"held-out prompts); speedup {float(metrics['spec/speedup']):.2f}x over AR "
                f"({float(metrics['spec/spec_tokens_per_s']):.0f} against {float(metrics['spec/ar_tokens_per_s']):.0f} "
                f"tokens/s, {tree}batch 1, {sp.n_prompts} held-out prompts, {same})"]
    lines = []
    if "spec/mean_acceptance_length" in metrics:
        lines.append(f"acceptance at the last validation: tau {float(metrics['spec/mean_acceptance_length']):.2f} "
                     f"tokens per step, acceptance rate {float(metrics['spec/acceptance_rate']):.3f} (greedy, "
                     f"{sp.n_prompts} held-out prompts)")
    why = ("spec.time_speedup=false" if not sp.time_speedup else "spec.every_n_val=0" if sp.every_n_val == 0
           else f"{world_size} processes; fit times it on one" if world_size > 1 else "no held-out prompts")
    lines.append(f"speedup: not measured ({why}); measure it with: python -m mtp_lightning bench --ckpt {last}")
    return lines


def summary_lines(cfg: Config, trainer, dm, run_dir: Path) -> list[str]:
    """Held-out bits per byte beside gzip -9's, the last acceptance, the checkpoints and what to run next."""
    metrics = trainer.callback_metrics
    lines = [f"run finished at step {trainer.global_step}: {run_dir}"]
    gzip_bpb = dm.gzip_bits_per_byte("val")
    if "val/verifier_bits_per_byte" in metrics:  # spec.verifier=lm_head: the LM head decides every token
        lines.append(f"held-out bits per byte: {float(metrics['val/verifier_bits_per_byte']):.3f} for the verifier "
                     f"(the LM head) at the last validation (gzip -9: {gzip_bpb:.3f} on the held-out split)")
    elif "val/bits_per_byte" in metrics:
        lines.append(f"held-out bits per byte: {float(metrics['val/bits_per_byte']):.3f} at the last validation "
                     f"(gzip -9: {gzip_bpb:.3f} on the held-out split)")
    else:
        lines.append(f"held-out bits per byte: not measured (no validation ran); gzip -9: {gzip_bpb:.3f}")
    best, last = _checkpoint_paths(trainer)
    lines += _acceptance_lines(cfg, metrics, last or run_dir / "checkpoints" / "last.ckpt", trainer.world_size)
    lines.append(f"checkpoints: best {best or 'none'}, last {last or 'none'}")
    more = 2 * cfg.trainer.max_steps
    lines += [
        f"train further: python -m mtp_lightning fit --resume last run.root={run_dir.parent} "
        f"run.name={run_dir.name} trainer.max_steps={more}",
        f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}",
    ]
    return lines
