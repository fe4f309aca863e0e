"""The ``generate`` and ``bench`` commands: decoding from a checkpoint, and AR vs speculative side by side."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from mtp_lightning.atomic import write_text
from mtp_lightning.checkpoints.io import load_for_inference
from mtp_lightning.errors import UserError
from mtp_lightning.machine import describe_machine, machine_line


def _check_args(args, model) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if not 0 <= args.draft_len <= model.n_future - 1:
        raise UserError(f"--draft-len={args.draft_len} must be between 0 (auto) and n_future - 1 = "
                        f"{model.n_future - 1} for this checkpoint")


def _verifier(args, cfg) -> str:
    return args.verifier or cfg.spec.verifier


def _eos_id(args, tok) -> int | None:
    """The tokenizer's end-of-sequence id, where decoding stops unless ``--ignore-eos`` is given."""
    return None if args.ignore_eos else tok.eot_id


def _draft_precision(args) -> str:
    from mtp_lightning.decoding.speculative import resolve_draft_precision

    try:
        resolve_draft_precision(args.draft_precision, "cpu")
    except ValueError as e:
        raise UserError(f"--draft-precision: {e}") from None
    return args.draft_precision


def _tree(args, cfg, model):
    """The ``spec.tree`` of the checkpoint with the command line's fields over it, checked; None when
    tree verification is off."""
    from dataclasses import replace

    from mtp_lightning.config_checks import check_tree

    given = {f: getattr(args, f"tree_{f}") for f in ("width", "experts", "depth", "budget")}
    tree = replace(cfg.spec.tree, **{f: v for f, v in given.items() if v is not None})
    tree = replace(tree, enabled=tree.enabled or args.tree)
    errors = check_tree(tree, model.n_future, "--tree-")
    if errors:
        raise UserError("; ".join(errors))
    return tree if tree.enabled else None


def generate(args) -> int:
    from mtp_lightning.decoding import Sampling, generate_ar, generate_speculative
    from mtp_lightning.decoding.metrics import SpecAcceptance
    from mtp_lightning.decoding.speculative import resolve_draft_len
    from mtp_lightning.decoding.tree import tree_depth, tree_summary

    model, tok, cfg = load_for_inference(args.ckpt)
    _check_args(args, model)
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise UserError(f"--temperature={args.temperature} must be >= 0, --top-k={args.top_k} >= 0 and "
                        f"--top-p={args.top_p} in (0, 1]")
    ids = tok.encode(args.prompt)
    if not ids:
        raise UserError("--prompt is empty; give at least one character of text")
    budget = model.max_seq_len - len(ids) - model.n_future
    if budget < 1:
        raise UserError(f"the prompt has {len(ids)} tokens; this model's context is {model.max_seq_len}: "
                        f"shorten the prompt")
    max_new = min(args.max_new_tokens, budget)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    generator = torch.Generator().manual_seed(args.seed)
    verifier = _verifier(args, cfg)
    eos_id = _eos_id(args, tok)
    tree = _tree(args, cfg, model) if args.mode == "spec" else None

    printed = [""]

    def stream(new_rows: list[list[int]]) -> None:
        stream.ids += [t for t in new_rows[0] if t != eos_id]  # the eos ends the text, it is not shown
        text = tok.decode(stream.ids)
        if not args.json and not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    stream.ids = []
    if not args.json:
        sys.stdout.write(args.prompt)
    if args.mode == "ar":
        out = generate_ar(model, [ids], max_new, verifier=verifier, sampling=sampling, generator=generator,
                          eos_id=eos_id)
        stream(out.tokens)
        stats = {}
    else:
        k = resolve_draft_len(model, args.draft_len) if tree is None else tree_depth(model, args.draft_len, tree)
        out = generate_speculative(model, [ids], max_new, verifier=verifier, draft_len=k, sampling=sampling,
                                   draft_precision=_draft_precision(args), generator=generator, eos_id=eos_id,
                                   on_step=stream, tree=tree)
        metric = SpecAcceptance(k)
        metric.update(*out.step_counts())
        m = metric.summary()
        stats = {"acceptance_rate": float(m["acceptance_rate"]),
                 "mean_acceptance_length": float(m["mean_acceptance_length"]),
                 "per_position": [float(x) for x in m["per_position"]]}
        if tree is not None:
            stats["tree"] = tree_summary([out])
    tokens = out.tokens[0]
    stopped_at_eos = eos_id is not None and tokens[-1] == eos_id
    text = tok.decode(tokens[:-1] if stopped_at_eos else tokens)
    result = {"text": text, "tokens": tokens, "mode": args.mode,
              "stop": "eos" if stopped_at_eos else "max_new_tokens",
              "tokens_per_s": len(tokens) / max(out.seconds, 1e-9),
              "acceptance_rate": stats.get("acceptance_rate"),
              "mean_acceptance_length": stats.get("mean_acceptance_length"),
              "per_position": stats.get("per_position"), "tree": stats.get("tree")}
    if args.json:
        print(json.dumps(result))
    else:
        sys.stdout.write(text[len(printed[0]):] + "\n")
        stop = f"stopped at {tok.eot_token}" if stopped_at_eos else "--max-new-tokens reached"
        line = f"[{args.mode}] {len(tokens)} tokens ({stop}), {result['tokens_per_s']:.1f} tokens/s"
        if stats:
            per = " ".join(f"{x:.2f}" for x in stats["per_position"])
            line += (f", acceptance rate {stats['acceptance_rate']:.3f}, mean acceptance length "
                     f"{stats['mean_acceptance_length']:.2f}, per position [{per}]")
        if stats.get("tree"):
            line += f", mean tree size {stats['tree']['mean_size']:.1f}, winners {stats['tree']['winners']}"
        print(line, file=sys.stderr)
    return 0


def _load_prompts(args, dm, tok, model) -> list[list[int]]:
    if args.prompts == "val":
        return dm.val_prompts(args.n_prompts, args.prompt_len).tolist()
    path = Path(args.prompts)
    if not path.is_file():
        raise UserError(f"--prompts '{args.prompts}' is neither 'val' nor an existing file; pass a text file "
                        f"with one prompt a line")
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"--prompts file '{path}' holds no prompt; write one prompt a line")
    return [tok.encode(ln)[-(model.max_seq_len // 2):] for ln in lines[: args.n_prompts]]


def fit_bench_lengths(args, model) -> list[str]:
    """Set ``args.prompt_len`` and ``args.max_new_tokens`` where the user left them out (None): the
    defaults, clipped so that prompt + new tokens + n_future fit the model's context. Returns one note
    per clipped default. Values the user gave are never changed; ``bench`` refuses them if they do not fit.
    """
    from mtp_lightning.cli import BENCH_MAX_NEW_TOKENS, BENCH_PROMPT_LEN

    room = model.max_seq_len - model.n_future  # prompt + new tokens
    notes = []
    if args.prompt_len is None:
        # half the room at most when the new tokens are also left to the default, so both stay useful
        cap = room // 2 if args.max_new_tokens is None else room - args.max_new_tokens
        args.prompt_len = min(BENCH_PROMPT_LEN, max(cap, 1))
        if args.prompt_len < BENCH_PROMPT_LEN:
            notes.append(f"--prompt-len {BENCH_PROMPT_LEN} (the default) clipped to {args.prompt_len}")
    if args.max_new_tokens is None:
        args.max_new_tokens = min(BENCH_MAX_NEW_TOKENS, max(room - args.prompt_len, 1))
        if args.max_new_tokens < BENCH_MAX_NEW_TOKENS:
            notes.append(f"--max-new-tokens {BENCH_MAX_NEW_TOKENS} (the default) clipped to {args.max_new_tokens}")
    return [f"{n} to fit this model's context of {model.max_seq_len} tokens (n_future {model.n_future})"
            for n in notes]


def bench(args) -> int:
    from mtp_lightning.data import checkpoint_datamodule
    from mtp_lightning.decoding.bench import (format_table, machine_load, plot_per_position, run_benchmark,
                                              timing_warnings)
    from mtp_lightning.objectives.heldout import heldout_metrics

    model, tok, cfg = load_for_inference(args.ckpt)
    for note in fit_bench_lengths(args, model):
        print(f"bench: {note}", file=sys.stderr)
    _check_args(args, model)
    tree = _tree(args, cfg, model)
    if not args.temperature > 0:
        raise UserError(f"--temperature={args.temperature} must be > 0 (it is the temperature of --sampled)")
    if args.n_prompts < 1 or args.batch_size < 1 or args.prompt_len < 1 or args.repeats < 1:
        raise UserError(f"--n-prompts, --batch-size, --prompt-len and --repeats must be >= 1 (got {args.n_prompts}, "
                        f"{args.batch_size}, {args.prompt_len}, {args.repeats})")
    if args.prompt_len + args.max_new_tokens + model.n_future > model.max_seq_len:
        raise UserError(f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} exceeds this "
                        f"model's context of {model.max_seq_len} tokens; lower one of them")
    dm = checkpoint_datamodule(cfg.data, cfg.tokenizer, model.n_future, cfg.run.seed, tok)
    prompts = _load_prompts(args, dm, tok, model)
    load, cores = machine_load()  # before this run's own threads
    t0 = time.perf_counter()
    result = run_benchmark(model, prompts, args.max_new_tokens, batch_size=args.batch_size,
                           verifier=_verifier(args, cfg), draft_len=args.draft_len, sampled=args.sampled,
                           draft_precision=_draft_precision(args), eos_id=_eos_id(args, tok),
                           repeats=args.repeats, tree=tree, temperature=args.temperature)
    result.update({"val_bits_per_byte": heldout_metrics(model, dm, max_batches=8)["bits_per_byte"],
                   "gzip_bits_per_byte": dm.gzip_bits_per_byte("val")})
    warnings = timing_warnings(result["ar_seconds"], result["spec_seconds"], result["speedup"],
                               result["mean_acceptance_length"], load, cores)
    result.update({"checkpoint": str(args.ckpt), "machine": describe_machine(),
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "load_average": load,
                   "cores": cores, "wall_s": time.perf_counter() - t0, "warnings": warnings})
    print(format_table({k: v for k, v in result.items() if k not in ("machine", "warnings")}))
    print(f"machine: {machine_line(result['machine'])}")
    for w in warnings:  # beside the table they qualify (stderr holds the notes on the lengths)
        print(f"warning: {w}")
    if args.json:
        out = Path(args.json)
        write_text(out, json.dumps(result, indent=2) + "\n")
        plot_per_position(result, str(out.with_suffix(".png")))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if result["identical"] and result.get("tree_identical", True) else 1
