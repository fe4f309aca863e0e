"""How concentrated the router's weights are where decoding evaluates them: if one expert usually held
nearly all the weight, a verifier could skip the others. Greedy speculative decoding of saved prompts,
recording every router evaluation (the verifier's positions and the drafts' own).

    python benchmarks/router_spread.py CKPT PROMPTS.pt [--n-prompts 8]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtp_lightning.checkpoints.io import load_for_inference  # noqa: E402
from mtp_lightning.decoding import generate_speculative  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("prompts")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()
    model, _, _ = load_for_inference(args.ckpt)
    prompts = torch.load(args.prompts)[: args.n_prompts]
    seen = []
    router_logw = model.router_logw

    def recording(z):
        logw = router_logw(z)
        seen.append(logw.exp().reshape(-1, logw.shape[-1]))
        return logw
    model.router_logw = recording
    for i in range(prompts.shape[0]):
        generate_speculative(model, prompts[i:i + 1], args.max_new_tokens)
    w = torch.cat(seen).sort(-1, descending=True).values  # (N, r)
    print(f"{w.shape[0]} router evaluations, rank {w.shape[1]}")
    print(f"mean top weight {w[:, 0].mean():.3f}; share with top weight > 0.9: {(w[:, 0] > 0.9).float().mean():.3f}, "
          f"> 0.99: {(w[:, 0] > 0.99).float().mean():.3f}")
    print(f"mean weight outside the top expert {(1 - w[:, 0]).mean():.3f}")


if __name__ == "__main__":
    main()
