"""Where a decoding step's time goes: wall time of each model call, per step, for AR and speculative
greedy decoding of one 128-token generation (after two warm-up runs).

    python benchmarks/decode_step_profile.py runs/default/checkpoints/last.ckpt [PROMPTS.pt]

Timers wrap the calls, so the parts add up to a little more than the step time they report. The lines
in brackets are parts of the calls above them, not further ones: every full-precision weight product
(``fastpath.project``: trunk, heads and unembedding) and the draft's int8 products
(``fastpath.project_int8``, draft maps and unembedding rows). Both decoders run inside one
``decoding()`` block, as ``bench`` does, so the weight copies are built in the warm-ups. The bracketed
lines at the end time each full-precision product shape that runs at least every other step, per call. A second
argument, a .pt file of prompt ids (K, T), decodes its first prompt instead of a random one.
"""

import collections
import sys
import time

import torch

from mtp_lightning.checkpoints.io import load_for_inference
from mtp_lightning.decoding import autoregressive as ar
from mtp_lightning.decoding import speculative as sp
from mtp_lightning.model import fastpath


def main(path: str, prompts: str | None = None) -> None:
    model, _, _ = load_for_inference(path)
    if prompts is not None:
        prompt = torch.load(prompts)[:1]  # (1, T)
    else:
        prompt = [torch.randint(0, model.unembedding.shape[0], (64,), generator=torch.Generator().manual_seed(0)).tolist()]
    total, calls = collections.defaultdict(float), collections.Counter()

    def timed(owner, name, label):
        f = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = f(*args, **kwargs)
            total[label] += time.perf_counter() - t
            calls[label] += 1
            return out
        setattr(owner, name, wrapper)

    timed(model, "extend", "trunk pass (extend)")
    timed(model, "verifier_and_factors", "verifier")
    timed(sp, "draft", "draft")
    timed(fastpath, "project", "(all weight products)")  # inside the calls above
    timed(fastpath, "project_int8", "(int8 draft products)")  # inside the step-by-step draft
    by_shape, shape_calls = collections.defaultdict(float), collections.Counter()
    project = fastpath.project

    def per_shape(x, weight, index=None, bias=None):  # inside the timer above: each product by its shape
        t = time.perf_counter()
        out = project(x, weight, index, bias)
        key = (x.numel() // x.shape[-1], x.shape[-1], out.shape[-1])
        by_shape[key] += time.perf_counter() - t
        shape_calls[key] += 1
        return out
    fastpath.project = per_shape
    for mode in ("ar", "spec"):
        # as the bench command: one decoding() block, so the weight copies are built in the warm-ups
        with fastpath.decoding():
            for _ in range(3):  # two warm-ups, then the measured run
                total.clear()
                calls.clear()
                by_shape.clear()
                shape_calls.clear()
                g = ar.generate_ar(model, prompt, 128) if mode == "ar" else sp.generate_speculative(model, prompt, 128)
        print(f"{mode}: {g.steps} steps, {(g.seconds - g.prefill_seconds) / g.steps * 1e3:.2f} ms per step, "
              f"{torch.get_num_threads()} threads")
        for label, seconds in total.items():
            print(f"  {label:22s} {seconds / g.steps * 1e3:6.3f} ms per step ({calls[label]} calls)")
        for (rows, d_in, d_out), seconds in sorted(by_shape.items()):
            n = shape_calls[(rows, d_in, d_out)]
            if n >= g.steps // 2:  # the step's products, not the prefill's
                print(f"  [{rows:2d} x {d_in:4d} -> {d_out:4d}] {seconds / n * 1e6:6.1f} us per call, "
                      f"{n / g.steps:.1f} calls per step")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
