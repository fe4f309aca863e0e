"""AR against speculative decoding of one checkpoint on saved prompt ids, on any device.

``python -m mtp_lightning bench`` rebuilds its held-out prompts from the corpus. A machine without that
corpus (the GPU machine: another Python, so another standard library) can still decode exactly the same
prompts from a file of token ids, written here with ``--save-prompts``:

    python benchmarks/decode_prompts_bench.py CKPT --save-prompts runs/gpu_carry/val_prompts_32x64.pt
    python benchmarks/decode_prompts_bench.py CKPT --save-weights runs/gpu_carry/weights.ckpt  # to carry
    python benchmarks/decode_prompts_bench.py CKPT --prompts runs/gpu_carry/val_prompts_32x64.pt \\
        --device cuda --json OUT.json

It prints one table row per setting (prompts, batch size) and writes every ``run_benchmark`` result
to the JSON. Held-out bits per byte are not computed here: they do not depend on the device
(``bench`` reports them for the same checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtp_lightning.atomic import write_text, writing  # noqa: E402
from mtp_lightning.checkpoints.io import META_KEY, load_for_inference, safe_load  # noqa: E402
from mtp_lightning.decoding.bench import run_benchmark  # noqa: E402
from mtp_lightning.machine import describe_machine, machine_line  # noqa: E402


def save_prompts(ckpt: str, out: str, n: int, length: int) -> None:
    from mtp_lightning.data import checkpoint_datamodule

    model, tok, cfg = load_for_inference(ckpt)
    dm = checkpoint_datamodule(cfg.data, cfg.tokenizer, model.n_future, cfg.run.seed, tok)
    with writing(out) as f:
        torch.save(dm.val_prompts(n, length), f)
    print(f"wrote {n} held-out prompts of {length} tokens to {out}")


def save_weights(ckpt: str, out: str) -> None:
    """The checkpoint without its optimizer and trainer state: a third of the size, and it decodes alike."""
    full = safe_load(ckpt)
    slim = {META_KEY: full[META_KEY],
            "state_dict": {k: v for k, v in full["state_dict"].items() if k.startswith("model.")}}
    with writing(out, what="weights") as f:
        torch.save(slim, f)
    print(f"wrote the model weights of {ckpt} to {out}")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return machine_line(describe_machine())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--prompts", help="a .pt file of prompt ids (K, T)")
    p.add_argument("--save-prompts", help="write the checkpoint's held-out prompts here and stop")
    p.add_argument("--save-weights", help="write the checkpoint's model weights (no optimizer state) here and stop")
    p.add_argument("--n-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--settings", default="8x1,32x1,32x8",
                   help="comma-separated PROMPTSxBATCH settings, each a run_benchmark call")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json")
    args = p.parse_args()
    if args.save_weights:
        save_weights(args.ckpt, args.save_weights)
        return 0
    if args.save_prompts:
        save_prompts(args.ckpt, args.save_prompts, args.n_prompts, args.prompt_len)
        return 0
    if not args.prompts:
        p.error("pass --prompts FILE (or --save-prompts FILE to write one)")
    model, _, _ = load_for_inference(args.ckpt, device=args.device)
    prompts = torch.load(args.prompts, weights_only=True).tolist()
    results = []
    print(f"device: {device_name(args.device)}; torch {torch.__version__}")
    print(f"{'prompts':>7} {'batch':>5} {'AR tok/s':>9} {'spec tok/s':>10} {'speedup':>7} {'tau':>5} "
          f"{'AR ms/step':>10} {'spec ms/step':>12} identical  per position")
    for setting in args.settings.split(","):
        n, b = (int(x) for x in setting.split("x"))
        r = run_benchmark(model, prompts[:n], args.max_new_tokens, batch_size=b, sampled=(b == 1))
        r["device"] = device_name(args.device)
        results.append(r)
        print(f"{n:7d} {b:5d} {r['ar_tokens_per_s']:9.1f} {r['spec_tokens_per_s']:10.1f} {r['speedup']:7.2f} "
              f"{r['mean_acceptance_length']:5.2f} {r['ar_ms_per_step']:10.2f} {r['spec_ms_per_step']:12.2f} "
              f"{str(r['identical']):>9}  {' '.join(f'{x:.3f}' for x in r['per_position'])}", flush=True)
    if args.json:
        write_text(args.json, json.dumps(results, indent=2))
    return 0 if all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
