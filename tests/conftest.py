"""Test session setup: offline Hugging Face, and caches in a temporary folder shared by the session.
Then the builders the test modules share, as fixtures: test modules never import one another.

A builder a test calls with arguments is a fixture that returns the function (``decoding_model(...)``).
The functions are module-level, so a test may hand one to a spawned worker process.
"""

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="mtp_lightning_tests_")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_TMP, "hf_home")
os.environ["MTP_LIGHTNING_CACHE"] = os.path.join(_TMP, "cache")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation, and on a busy 2-core machine it
    makes every op wait for a core (4x slower measured). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- tiny models --------------------------------------------------------------------------------------

def build_decoding_model(kind: str = "mlp", rank: int = 3, vocab: int = 50, n_future: int = 4, seed: int = 0,
                         max_seq_len: int = 64):
    """A random 2-layer d=32 CPModel in eval mode. Its embeddings are scaled up so that greedy decoding
    neither collapses onto one repeated token (every draft accepted) nor has near-ties (argmax flips
    between a 1-token and a k-token pass): the drafts are then accepted sometimes, which is what parity
    needs."""
    from mtp_lightning.config import GPTConfig, HeadsConfig, ModelConfig
    from mtp_lightning.model.cp_model import CPModel

    torch.manual_seed(seed)
    cfg = ModelConfig(gpt=GPTConfig(n_layer=2, n_head=2, d_model=32, max_seq_len=max_seq_len, vocab_size=vocab),
                      heads=HeadsConfig(n_future=n_future, rank=rank, kind=kind))
    model = CPModel(cfg).eval()
    with torch.no_grad():
        model.trunk.wte.weight.mul_(3.0)
        model.trunk.wpe.weight.mul_(10.0)
    return model


def build_loss_model(n=3, r=2, V=4, D=8, kind="mlp", seed=0):
    """(CPModel, Config): 1 layer, width D, vocabulary V, small enough to enumerate V^n outcomes; the
    router's weights are large so that the experts' mixture weights are clearly non-uniform."""
    from mtp_lightning.config import load_config
    from mtp_lightning.model.cp_model import CPModel

    torch.manual_seed(seed)
    cfg = load_config(overrides=[f"model.heads.n_future={n}", f"model.heads.rank={r}", "model.gpt.n_layer=1",
                                 f"model.gpt.d_model={D}", "model.gpt.n_head=2", f"model.heads.kind={kind}",
                                 "model.gpt.max_seq_len=16", "data.seq_len=8",
                                 "spec.every_n_val=0", "model.loss.position_fraction=1.0",
                                 "model.loss.next_token_weight=0.0"])
    cfg.model.gpt.vocab_size = V
    model = CPModel(cfg.model)
    torch.nn.init.normal_(model.heads.router.weight, std=1.0)
    return model, cfg


@pytest.fixture(scope="session")
def decoding_model():
    return build_decoding_model


@pytest.fixture(scope="session")
def loss_model():
    return build_loss_model


def check_greedy_parity(model, prompts: list[list[int]], max_new_tokens: int,
                        verifiers=("marginal", "lm_head"), draft_lens=None, draft_precision: str = "auto"
                        ) -> tuple[int, int]:
    """Greedy speculative decoding == greedy AR token for token: per row and as one left-padded batch,
    for every draft length and verifier (drafts in ``draft_precision``; auto is int8 on the CPU).
    Padded-batch AR must also equal per-row AR. Returns the accepted and the drafted tokens summed over
    all runs, so a caller can check that the run took both the accept and the reject paths."""
    from mtp_lightning.decoding import generate_ar, generate_speculative

    draft_lens = draft_lens or range(1, model.n_future)
    accepted = drafted = 0
    for verifier in verifiers:
        ref = [generate_ar(model, [p], max_new_tokens, verifier=verifier).tokens[0] for p in prompts]
        assert all(len(r) == max_new_tokens for r in ref)
        assert generate_ar(model, prompts, max_new_tokens, verifier=verifier).tokens == ref, \
            f"padded-batch AR differs from per-row AR ({verifier})"
        for k in draft_lens:
            batch = generate_speculative(model, prompts, max_new_tokens, verifier=verifier, draft_len=k,
                                         draft_precision=draft_precision)
            assert batch.tokens == ref, f"batched speculative differs from AR (verifier={verifier}, k={k})"
            for p, r in zip(prompts, ref):
                one = generate_speculative(model, [p], max_new_tokens, verifier=verifier, draft_len=k,
                                           draft_precision=draft_precision)
                assert one.tokens == [r], f"speculative differs from AR (verifier={verifier}, k={k}, {p})"
            for gen in (batch, one):
                accepted += sum(map(sum, gen.accepted))
                drafted += sum(map(sum, gen.drafted))
    return accepted, drafted


@pytest.fixture(scope="session")
def greedy_parity():
    return check_greedy_parity


# ---- run folders --------------------------------------------------------------------------------------

def read_tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard files as (step, value) lists, and the histogram tags under
    ``"__histograms__"``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    out = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    out["__histograms__"] = ea.Tags()["histograms"]
    return out


@pytest.fixture(scope="session")
def tb_scalars():
    return read_tb_scalars


# ---- tiny Hugging Face models (offline) ---------------------------------------------------------------

def _training_texts(max_bytes: int = 200_000) -> list[str]:
    """Some of the standard library's own source: the same kind of text the fits train on."""
    texts, total = [], 0
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total > max_bytes:
            break
    return texts


def build_tiny_hf(folder: Path, arch: str, vocab: int = 384, seed: int = 0) -> Path:
    """A random 2-layer, width-32 causal LM (``gpt2`` or ``llama``) and its tokenizer in
    ``save_pretrained`` layout.

    The embedding has a few more rows than the tokenizer has ids (as many hub models do). Embeddings
    are scaled up so that greedy decoding has no near-ties (which would let a 1-token and a k-token
    pass disagree in the last bit) and does not collapse onto one repeated token."""
    import transformers

    from mtp_lightning.data.tokenizer import EOT, Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.train_bpe(_training_texts(), vocab)
    tok.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT}))
    ids = dict(eos_token_id=tok.eot_id, bos_token_id=tok.eot_id, pad_token_id=tok.eot_id)
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=tok.vocab_size + 8,
                                      n_positions=128, **ids)
        lm = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       vocab_size=tok.vocab_size + 8, max_position_embeddings=128,
                                       tie_word_embeddings=False, **ids)
        lm = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        lm.get_input_embeddings().weight.mul_(3.0)
        if arch == "gpt2":
            lm.transformer.wpe.weight.mul_(10.0)
    lm.save_pretrained(folder)
    return folder


def build_hf_model(folder: Path, kind: str = "mlp", train_mode: str = "heads_only", n_future: int = 4,
                   rank: int = 3):
    """CP heads on the Hugging Face model saved in ``folder``."""
    from mtp_lightning.config import BackboneConfig, HeadsConfig, ModelConfig
    from mtp_lightning.model.cp_model import CPModel

    cfg = ModelConfig(backbone=BackboneConfig(kind="hf", name_or_path=str(folder), train_mode=train_mode),
                      heads=HeadsConfig(n_future=n_future, rank=rank, kind=kind))
    return CPModel(cfg)


def read_base_weights(folder: Path) -> dict[str, torch.Tensor]:
    import transformers

    lm = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {k: v.clone() for k, v in lm.state_dict().items()}


def hf_fit_args(folder: Path, root: Path, name: str, *extra: str) -> list[str]:
    """``fit`` arguments for a 6-step heads run on the HF model in ``folder`` (conf/finetune_code.yaml)."""
    return ["fit", "--config", str(REPO / "conf" / "finetune_code.yaml"), f"model.backbone.name_or_path={folder}",
            f"run.root={root}", f"run.name={name}", "trainer.progress_bar=false", "trainer.max_steps=6",
            "trainer.val_check_interval=3", "checkpoint.every_n_steps=3", "trainer.log_every_n_steps=2",
            "trainer.limit_val_batches=1", "trainer.precision=32-true", "data.seq_len=32",
            "data.batch_size=4", "data.max_bytes=300000", "model.heads.n_future=3", "model.heads.rank=2",
            "spec.n_prompts=2", "spec.prompt_len=12", "spec.max_new_tokens=10", "optim.warmup_steps=2",
            *extra]


# ---- statistics ----------------------------------------------------------------------------------------

def pooled_chi_square(outcomes: torch.Tensor, probs: torch.Tensor, min_expected: float) -> tuple[float, float]:
    """Pearson's statistic over bins that each expect >= ``min_expected`` draws (outcomes sorted by
    probability, the least likely pooled into one bin), and its 0.999 critical value (Wilson-Hilferty)."""
    import math

    N = outcomes.numel()
    order = probs.argsort(descending=True)
    kept = int((probs[order] * N >= min_expected).sum())
    bin_of = torch.full_like(probs, kept, dtype=torch.long)
    bin_of[order[:kept]] = torch.arange(kept)
    expected = torch.cat([probs[order[:kept]], probs[order[kept:]].sum()[None]]) * N  # (kept + 1,)
    observed = torch.bincount(bin_of[outcomes], minlength=kept + 1).double()
    if kept == probs.numel():  # nothing to pool: no empty last bin
        expected, observed = expected[:-1], observed[:-1]
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = expected.numel() - 1
    return stat, df * (1 - 2 / (9 * df) + 3.090 * math.sqrt(2 / (9 * df))) ** 3


@pytest.fixture(scope="session")
def chi_square():
    return pooled_chi_square


@pytest.fixture(scope="session")
def training_texts():
    return _training_texts


@pytest.fixture(scope="session")
def gguf_writer():
    """``write(path, vocab=384, seed=0, ...)``: a tiny random Llama (and its BPE tokenizer) as a GGUF file."""
    from tests.gguf_fixture import write_tiny_llama_gguf

    def write(path: Path, *args, **kwargs) -> Path:
        return write_tiny_llama_gguf(path, _training_texts(), *args, **kwargs)

    return write


@pytest.fixture(scope="session")
def tiny_hf():
    return build_tiny_hf


@pytest.fixture(scope="session")
def hf_model():
    return build_hf_model


@pytest.fixture(scope="session")
def base_weights():
    return read_base_weights


@pytest.fixture(scope="session")
def fit_args():
    return hf_fit_args


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def base_folder(request, tmp_path_factory):
    """Each tiny HF architecture once per module that asks for it."""
    pytest.importorskip("transformers")
    return build_tiny_hf(tmp_path_factory.mktemp(request.param), request.param)
