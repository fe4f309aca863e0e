"""AR against greedy speculative decoding of the same held-out prompts, each prompt decoded R times by
both (interleaved: AR, then speculative, prompt by prompt, round by round), in one ``decoding()``
block. It prints the speedup from the first round, from each prompt's median and from each prompt's
fastest time, so a noisy machine's effect on the ratio shows.

    python benchmarks/decode_best_of.py runs/default/checkpoints/last.ckpt [N_PROMPTS] [ROUNDS]

N_PROMPTS (default 8) held-out prompts of 64 tokens, as ``bench`` draws them; 128 new tokens each.
"""

import statistics
import sys

import torch

from mtp_lightning.checkpoints.io import load_for_inference
from mtp_lightning.data import checkpoint_datamodule
from mtp_lightning.decoding import autoregressive as ar
from mtp_lightning.decoding import speculative as sp
from mtp_lightning.model import fastpath


def main(ckpt: str, n_prompts: int = 8, rounds: int = 5) -> None:
    model, tok, cfg = load_for_inference(ckpt)
    dm = checkpoint_datamodule(cfg.data, cfg.tokenizer, model.n_future, cfg.run.seed, tok)
    prompts = dm.val_prompts(n_prompts, 64).tolist()
    with torch.inference_mode(), fastpath.decoding():
        ar.generate_ar(model, [prompts[0]], 8)  # warm-up: builds the weight copies
        sp.generate_speculative(model, [prompts[0]], 8)
        t_ar, t_sp = [[] for _ in prompts], [[] for _ in prompts]
        n_tokens, identical = 0, True
        for r in range(rounds):
            for i, p in enumerate(prompts):
                a = ar.generate_ar(model, [p], 128)
                s = sp.generate_speculative(model, [p], 128)
                t_ar[i].append(a.seconds)
                t_sp[i].append(s.seconds)
                identical &= a.tokens == s.tokens
                n_tokens += len(a.tokens[0]) if r == 0 else 0
    print(f"{n_prompts} prompts x {rounds} rounds, {torch.get_num_threads()} threads")
    for name, pick in (("first round", lambda x: x[0]), ("median", statistics.median), ("fastest", min)):
        a, s = sum(map(pick, t_ar)), sum(map(pick, t_sp))
        print(f"{name:12s} AR {n_tokens / a:7.1f} tokens/s  spec {n_tokens / s:7.1f} tokens/s  "
              f"speedup {a / s:.3f}  identical {identical}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(x) for x in sys.argv[2:4]))
