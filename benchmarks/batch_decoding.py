"""Batched speculative decoding against batched AR: where the time of a step goes, and which draft length pays.

Two tables for one checkpoint, on held-out prompts of its own corpus:

1. **Decoding**, per batch size B and draft length k (k = 0 is plain KV-cached AR): tokens/s, the
   speedup over AR at the same B, tau, ms per step and whether the greedy outputs equal AR's. The
   decoders take turns batch by batch (the order rotated each time), so drift in the machine's speed
   reaches all alike; rates are medians over ``--repeats``.
2. **Step costs**, per B and fed positions P = k + 1, on a cache already holding the prompt and 64
   generated tokens: the trunk's ``extend`` over P new positions, the verifier over them
   (``verifier_and_factors``, as greedy decoding calls it) and the k-token draft, in ms per call
   (medians of ``--calls``). A speculative step costs draft + extend(P) + verifier(P) and emits
   tau tokens; an AR step costs extend(1) + verifier(1) and emits one. Where extend and verifier
   grow with B * P (compute-bound), a step of k drafts costs nearly (k + 1)x an AR step and tau
   cannot pay for it.

    python benchmarks/batch_decoding.py --ckpt runs/default/checkpoints/last.ckpt --n-prompts 32 \
        --batch-sizes 1 4 8 --json runs/default/batch_decoding.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mtp_lightning.checkpoints.io import load_for_inference
from mtp_lightning.data import checkpoint_datamodule
from mtp_lightning.decoding.autoregressive import generate_ar, left_pad, prefill, prepare_prompts
from mtp_lightning.decoding.metrics import SpecAcceptance
from mtp_lightning.decoding.sampling import GREEDY
from mtp_lightning.decoding.speculative import draft, generate_speculative, resolve_draft_precision
from mtp_lightning.model import fastpath


def decode_table(model, prompts, batch_sizes, draft_lens, max_new_tokens, verifier, repeats):
    rows = []
    for B in batch_sizes:
        batches = [left_pad(prompts[i:i + B]) for i in range(0, len(prompts), B)]
        idx, mask = batches[0]
        for k in draft_lens:  # warm-up
            run(model, idx, mask, k, min(8, max_new_tokens), verifier)
        seconds = {k: [0.0] * repeats for k in draft_lens}
        outputs, metrics, steps, stepping = {}, {}, {k: 0 for k in draft_lens}, {k: 0.0 for k in draft_lens}
        turn = 0
        for rep in range(repeats):
            for b, (idx, mask) in enumerate(batches):
                order = draft_lens[turn % len(draft_lens):] + draft_lens[:turn % len(draft_lens)]
                turn += 1
                for k in order:
                    g = run(model, idx, mask, k, max_new_tokens, verifier)
                    seconds[k][rep] += g.seconds
                    if rep == 0:
                        outputs.setdefault(k, []).extend(g.tokens)
                        steps[k] += g.steps
                        stepping[k] += g.seconds - g.prefill_seconds
                        if k:
                            metrics.setdefault(k, SpecAcceptance(k)).update(*g.step_counts())
        n_tokens = sum(map(len, outputs[draft_lens[0]]))
        ar_tps = statistics.median(n_tokens / s for s in seconds[0]) if 0 in seconds else None
        for k in draft_lens:
            tps = statistics.median(n_tokens / s for s in seconds[k])
            tau = float(metrics[k].summary()["mean_acceptance_length"]) if k else 1.0
            rows.append({"batch_size": B, "draft_len": k, "tokens_per_s": tps,
                         "speedup": tps / ar_tps if ar_tps else None, "tau": tau,
                         "ms_per_step": 1e3 * stepping[k] / max(steps[k], 1),
                         "identical": outputs[k] == outputs[draft_lens[0]]})
    return rows


def run(model, idx, mask, k, max_new_tokens, verifier):
    if k == 0:
        return generate_ar(model, idx, max_new_tokens, pad_mask=mask, verifier=verifier)
    return generate_speculative(model, idx, max_new_tokens, pad_mask=mask, verifier=verifier, draft_len=k)


def _median_ms(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def step_costs(model, prompts, batch_sizes, max_k, verifier, calls):
    """extend(P), verifier(P) and draft(k) in ms per call at each batch size, on a cache of prompt + 64."""
    int8 = resolve_draft_precision("auto", "cpu")
    rows = []
    for B in batch_sizes:
        idx, mask = left_pad(prompts[:B])
        idx, mask, slots = prepare_prompts(model, idx, mask, 64 + max_k + 2, verifier, max_k)
        cache, zt, st, lp1, c = prefill(model, idx, mask, slots, verifier, GREEDY, None)
        for _ in range(64):  # grow the cache by 64 tokens, as a decode would
            z, states = model.extend(c[:, None], cache, None)
            logp, lp1 = model.verifier_and_factors(z, states, verifier, probs=True)
            c = logp[:, -1].argmax(-1)
        zt, st = z[:, -1], [s[:, -1] for s in states]
        j1 = None if lp1 is None else lp1[:, -1]
        length = cache.lengths.clone()
        for P in range(1, max_k + 2):
            fed = c[:, None].expand(B, P).contiguous()

            def extend():
                model.extend(fed, cache, None)
                cache.crop(length)

            z, states = model.extend(fed, cache, None)
            cache.crop(length)
            k = P - 1
            rows.append({
                "batch_size": B, "positions": P, "rows": B * P,
                "extend_ms": _median_ms(extend, calls),
                "verifier_ms": _median_ms(lambda: model.verifier_and_factors(z, states, verifier, probs=True), calls),
                "draft_ms": _median_ms(lambda: draft(model, zt, st, j1, c, k, GREEDY, None, int8, k), calls) if k else 0.0,
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--draft-lens", type=int, nargs="+", default=None, help="0 is AR (default: 0..n_future-1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    model, tok, cfg = load_for_inference(args.ckpt)
    model.eval()
    dm = checkpoint_datamodule(cfg.data, cfg.tokenizer, model.n_future, cfg.run.seed, tok)
    prompts = dm.val_prompts(args.n_prompts, args.prompt_len).tolist()
    verifier = cfg.spec.verifier
    draft_lens = args.draft_lens or list(range(model.n_future))
    with torch.inference_mode(), fastpath.decoding():
        decoding = decode_table(model, prompts, args.batch_sizes, draft_lens, args.max_new_tokens, verifier,
                                args.repeats)
        costs = step_costs(model, prompts, args.batch_sizes, model.n_future - 1, verifier, args.calls)
    print(f"{args.n_prompts} prompts x {args.max_new_tokens} new tokens, verifier {verifier}, "
          f"{torch.get_num_threads()} threads")
    print("| batch | draft len | tokens/s | speedup over AR | tau | ms/step | identical |")
    print("|---|---|---|---|---|---|---|")
    for r in decoding:
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"| {r['batch_size']} | {r['draft_len'] or 'AR'} | {r['tokens_per_s']:.1f} | {sp} | {r['tau']:.2f} "
              f"| {r['ms_per_step']:.2f} | {r['identical']} |")
    print()
    print("| batch | positions fed | rows | extend ms | verifier ms | draft ms | step ms | x AR step |")
    print("|---|---|---|---|---|---|---|---|")
    ar_step = {r["batch_size"]: r["extend_ms"] + r["verifier_ms"] for r in costs if r["positions"] == 1}
    for r in costs:
        step = r["extend_ms"] + r["verifier_ms"] + r["draft_ms"]
        print(f"| {r['batch_size']} | {r['positions']} | {r['rows']} | {r['extend_ms']:.2f} | {r['verifier_ms']:.2f} "
              f"| {r['draft_ms']:.2f} | {step:.2f} | {step / ar_step[r['batch_size']]:.2f} |")
    if args.json:
        from mtp_lightning.atomic import write_text

        write_text(args.json, json.dumps({"decoding": decoding, "step_costs": costs}, indent=2))


if __name__ == "__main__":
    main()
