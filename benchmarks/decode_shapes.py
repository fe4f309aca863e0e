"""What a speculative step costs against an AR step, for several trunk and head shapes.

A freshly initialised model repeats itself, so its drafts are nearly always accepted: its step times
are those of a best case and need no training. The ratio spec/AR of the ms per step is what tau must
beat: the speedup is tau * AR / spec (tau = tokens per speculative step). The last column applies it
to a given tau (default 2.90, the default run's greedy tau in docs/benchmarks.md).

    python benchmarks/decode_shapes.py [--tau 2.9] [--reps 6] L,D,H,R [L,D,H,R ...]

L layers, D width, H attention heads, R CP rank (n=4, MLP heads, vocabulary 4096). Each shape decodes
one 64-token prompt for 96 tokens, AR and speculative interleaved, in one ``fastpath.decoding()`` block
as ``bench`` does, and reports the medians of the repetitions after the first (which builds the weight
copies).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtp_lightning.config import GPTConfig, HeadsConfig, ModelConfig  # noqa: E402
from mtp_lightning.decoding.autoregressive import generate_ar  # noqa: E402
from mtp_lightning.decoding.speculative import generate_speculative  # noqa: E402
from mtp_lightning.model import fastpath  # noqa: E402
from mtp_lightning.model.cp_model import CPModel  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("shapes", nargs="+", help="L,D,H,R")
    p.add_argument("--tau", type=float, default=2.90)
    p.add_argument("--reps", type=int, default=6)
    args = p.parse_args()
    print(f"{torch.get_num_threads()} threads; medians of {args.reps - 1} runs")
    print(f"{'layers':>6} {'d':>4} {'heads':>5} {'rank':>4} {'AR ms/step':>10} {'spec ms/step':>12} {'spec/AR':>7} "
          f"{'tau (fresh)':>11} {f'speedup at tau {args.tau:.2f}':>22}")
    for shape in args.shapes:
        L, D, H, R = (int(x) for x in shape.split(","))
        cfg = ModelConfig(gpt=GPTConfig(n_layer=L, n_head=H, d_model=D, vocab_size=4096, max_seq_len=256),
                          heads=HeadsConfig(rank=R))
        torch.manual_seed(0)
        model = CPModel(cfg).eval()
        prompt = [torch.randint(0, 4096, (64,)).tolist()]
        ar_ms, sp_ms = [], []
        with fastpath.decoding():  # as ``bench``: the weight copies are built once, in the first repetition
            for _ in range(args.reps):
                g = generate_ar(model, prompt, 96)
                ar_ms.append(1e3 * (g.seconds - g.prefill_seconds) / g.steps)
                s = generate_speculative(model, prompt, 96)
                sp_ms.append(1e3 * (s.seconds - s.prefill_seconds) / s.steps)
        a, b = statistics.median(ar_ms[1:]), statistics.median(sp_ms[1:])
        tau = (s.n_tokens - 1) / s.steps
        print(f"{L:6d} {D:4d} {H:5d} {R:4d} {a:10.2f} {b:12.2f} {b / a:7.2f} {tau:11.2f} {args.tau * a / b:22.2f}",
              flush=True)


if __name__ == "__main__":
    main()
