"""An experiment, not a product path: would ``torch.compile`` change the speculative speedup on the CPU?

It decodes the same held-out prompts greedily, AR and speculative, batch 1, in two ways:
- ``eager``: the decoders as shipped (``generate_ar`` / ``generate_speculative``);
- ``compiled``: one AR step and one speculative step (draft, verification pass, acceptance, crop) each
  compiled whole by inductor with ``max_autotune`` (its CPU micro-GEMM kernels) and ``freezing``, over a
  KV cache whose attention spans all its slots, so every step has the same shapes.

It prints ms per step, tokens per step and the speedup of each, and whether the compiled decoders emit
exactly the eager tokens. Compiling takes a few minutes on 2 cores (inductor caches it for a rerun).

    python benchmarks/decode_prompts_bench.py CKPT --save-prompts P.pt   # held-out prompts, once
    python benchmarks/compiled_decode_step.py CKPT P.pt [--n-prompts 4] [--max-new-tokens 128] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtp_lightning.checkpoints.io import load_for_inference  # noqa: E402
from mtp_lightning.decoding import speculative as sp  # noqa: E402
from mtp_lightning.decoding.autoregressive import generate_ar, last_position  # noqa: E402
from mtp_lightning.decoding.sampling import GREEDY  # noqa: E402
from mtp_lightning.model.gpt import KVCache  # noqa: E402


class StaticKVCache(KVCache):
    """Attends over all ``max_len`` slots (unwritten ones masked), so shapes never change; lengths are
    updated in place and nothing reads a tensor back to the host."""

    def prepare(self, pad_mask: torch.Tensor) -> torch.Tensor:
        B, T = pad_mask.shape
        slots = self.lengths[:, None] + torch.arange(T, device=pad_mask.device)  # (B, T)
        self.valid.scatter_(1, slots, pad_mask)
        self.used = self.max_len
        positions = (self.valid.long().cumsum(1) - 1).clamp(min=0).gather(1, slots)
        key_idx = torch.arange(self.max_len, device=pad_mask.device)
        causal = key_idx[None, None, :] <= slots[:, :, None]
        mask = (causal & self.valid[:, None, :]) | (key_idx[None, None, :] == slots[:, :, None])
        self.slots, self.mask = slots, mask[:, None]
        return positions

    def advance(self, n_new: int) -> None:
        self.lengths.add_(n_new)

    def crop(self, lengths: torch.Tensor) -> None:
        self.lengths.copy_(lengths)


def static_cache(model, prompt: torch.Tensor, slots: int) -> StaticKVCache:
    """The cache ``model.new_cache(1, slots)`` would build (same layers and shapes), as a StaticKVCache."""
    t = model.trunk
    return StaticKVCache(t.cfg.n_layer + model.heads.n_cache_layers, 1, t.cfg.n_head, slots,
                         t.cfg.d_model // t.cfg.n_head, prompt.device, t.wte.weight.dtype)


def compiled_decoders(model, max_slots: int, k: int):
    """Compiled greedy decoders, each ``(prompt (1, T), N) -> (tokens, seconds with the prefill, seconds
    of the steps, steps)``, like the eager wrappers in ``main``."""
    state = {}
    rows = torch.arange(1)

    def ar_step(tok):
        cache = state["cache"]
        z, states = model.extend(tok[:, None], cache)
        zt, st = last_position(z, states)
        return model.verifier_logprobs(zt, st, "marginal").argmax(-1)

    def spec_step(zt, st, lp1, c):
        cache = state["cache"]
        drafts, _ = sp.draft(model, zt, st, lp1, c, k, GREEDY, None)
        z, states = model.extend(torch.cat([c[:, None], drafts], 1), cache)
        logp, lp1 = model.verifier_and_factors(z, states, "marginal")
        m, c = sp.verify(logp, drafts, None, None, GREEDY, None)
        cache.crop(cache.lengths - k + m)
        zt, st = sp._at(z, states, rows, m, k + 1)
        return drafts, m, c, zt, st, lp1[rows, m]

    ar_c = torch.compile(ar_step, fullgraph=True)
    spec_c = torch.compile(spec_step, fullgraph=True)

    def prefill(prompt):
        state["cache"] = cache = static_cache(model, prompt, max_slots)
        z, states = model.extend(prompt, cache)
        zt, st = last_position(z, states)
        logp, lp1 = model.verifier_and_factors(zt, st, "marginal")
        return zt, st, lp1, logp.argmax(-1)

    def ar(prompt, n):
        t0 = time.perf_counter()
        _, _, _, tok = prefill(prompt)
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(n - 1):
            tok = ar_c(tok)
            out.append(tok)
        tokens = torch.cat(out).tolist()
        return tokens, time.perf_counter() - t0, time.perf_counter() - t1, n - 1

    def spec(prompt, n):
        t0 = time.perf_counter()
        zt, st, lp1, c = prefill(prompt)
        t1 = time.perf_counter()
        out, steps = [int(c)], 0
        while len(out) < n:
            drafts, m, c, zt, st, lp1 = spec_c(zt, st, lp1, c)
            host = torch.cat([drafts[0], m, c]).tolist()
            out += host[: host[k]] + [host[k + 1]]
            steps += 1
        return out[:n], time.perf_counter() - t0, time.perf_counter() - t1, steps

    return ar, spec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("prompts", help="a .pt file of prompt ids (K, T), from decode_prompts_bench.py --save-prompts")
    p.add_argument("--n-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler tables (inductor kernels named) of the compiled AR and "
                        "speculative decoding of the first prompt")
    args = p.parse_args()
    import torch._inductor.config as inductor

    inductor.cpp.enable_kernel_profile = args.profile
    inductor.freezing = True
    inductor.max_autotune = True
    inductor.max_autotune_gemm_backends = "CPP,ATEN"
    model, _, _ = load_for_inference(args.ckpt)
    k, n = model.n_future - 1, args.max_new_tokens
    prompts = torch.load(args.prompts, weights_only=True)[: args.n_prompts]
    max_slots = prompts.shape[1] + n + 2 * k
    ar_c, spec_c = compiled_decoders(model, max_slots, k)

    def ar_e(prompt, n):
        g = generate_ar(model, prompt, n)
        return g.tokens[0], g.seconds, g.seconds - g.prefill_seconds, g.steps

    def spec_e(prompt, n):
        g = sp.generate_speculative(model, prompt, n)
        return g.tokens[0], g.seconds, g.seconds - g.prefill_seconds, g.steps

    print(f"{torch.get_num_threads()} threads, {len(prompts)} held-out prompts x {n} new tokens, greedy, batch 1")
    with torch.inference_mode():
        t = time.perf_counter()
        ar_c(prompts[:1], 8)
        spec_c(prompts[:1], 16)
        print(f"compiling both steps: {time.perf_counter() - t:.0f} s")
        rows = {}
        for rep in range(args.reps):  # interleaved, so drift on a shared machine hits every variant
            for name, (ar, spec) in {"eager": (ar_e, spec_e), "compiled": (ar_c, spec_c)}.items():
                a_tok, s_tok, a_s, s_s, a_steps, s_steps, a_step_s, s_step_s = [], [], 0.0, 0.0, 0, 0, 0.0, 0.0
                for prompt in prompts:
                    ta, sa, da, na = ar(prompt[None], n)
                    ts, ss, ds, ns = spec(prompt[None], n)
                    a_tok.append(ta), s_tok.append(ts)
                    a_s, s_s, a_steps, s_steps = a_s + sa, s_s + ss, a_steps + na, s_steps + ns
                    a_step_s, s_step_s = a_step_s + da, s_step_s + ds
                rows.setdefault(name, []).append(dict(
                    ar_ms=1e3 * a_step_s / a_steps, spec_ms=1e3 * s_step_s / s_steps,
                    ar_tps=len(prompts) * n / a_s, spec_tps=len(prompts) * n / s_s,
                    tokens_per_step=(len(prompts) * (n - 1)) / s_steps, tokens=(a_tok, s_tok)))
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for name, run in (("AR", ar_c), ("speculative", spec_c)):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    steps = run(prompts[:1], n)[3]
                print(f"compiled {name}, {steps} steps; divide the totals by the steps")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16))
    ref = rows["eager"][0]["tokens"][0]
    print(f"{'decoders':>9} {'AR ms/step':>10} {'spec ms/step':>12} {'ratio':>5} {'AR tok/s':>8} {'spec tok/s':>10} "
          f"{'speedup':>7} {'tok/step':>8}  same tokens as eager AR")
    for name, reps in rows.items():
        med = {key: statistics.median(r[key] for r in reps) for key in ("ar_ms", "spec_ms", "ar_tps", "spec_tps")}
        same = all(r["tokens"][0] == ref and r["tokens"][1] == ref for r in reps)
        print(f"{name:>9} {med['ar_ms']:10.2f} {med['spec_ms']:12.2f} {med['spec_ms'] / med['ar_ms']:5.2f} "
              f"{med['ar_tps']:8.1f} {med['spec_tps']:10.1f} {med['spec_tps'] / med['ar_tps']:7.2f} "
              f"{reps[0]['tokens_per_step']:8.2f}  {same}")


if __name__ == "__main__":
    main()
