"""``python -m mtp_lightning <command>``: fit, validate, test, generate, bench, sweep.

Bad input is a ``UserError``: one line on stderr, exit code 2, no traceback unless ``--debug``. The
config of ``fit``, ``validate`` and ``test`` is checked before torch and Lightning are imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from mtp_lightning.errors import UserError

CONFIG_HELP = ("YAML config file(s), merged in order over the typed defaults; dotted key=value "
               "overrides come last (e.g. trainer.max_steps=100 model.heads.rank=8)")


BENCH_PROMPT_LEN, BENCH_MAX_NEW_TOKENS = 64, 128


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")


def add_tree_arguments(p: argparse.ArgumentParser) -> None:
    """``--tree`` and its fields (``spec.tree``); a field not given keeps the checkpoint's value."""
    p.add_argument("--tree", action="store_true",
                   help="verify a tree of candidates per step (one row at a time; greedy, or sampled with "
                        "the same distribution as AR sampling) instead of one chain")
    p.add_argument("--tree-width", type=int, default=None, metavar="N", help="top-k tokens tried per offset")
    p.add_argument("--tree-experts", type=int, default=None, metavar="N", help="experts whose own chains join")
    p.add_argument("--tree-depth", type=int, default=None, metavar="N", help="deepest offset (0: the draft length)")
    p.add_argument("--tree-budget", type=int, default=None, metavar="N", help="most draft nodes per pass")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtp_lightning",
                                     description="Train and decode with rank-r CP multi-token heads.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="train a model (default: CP heads on the Python standard library)")
    _common(p)
    p.add_argument("--resume", metavar="last|PATH",
                   help="continue run.name from its newest checkpoint ('last') or from a .ckpt file")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing but errors: no preamble, progress bar or summary")

    for name, what in (("validate", "validation"), ("test", "test")):
        p = sub.add_parser(name, help=f"evaluate a checkpoint on the {what} split")
        _common(p)
        p.add_argument("--ckpt", metavar="PATH", help="checkpoint (default: run.name's last)")

    p = sub.add_parser("generate", help="decode from a prompt, autoregressively or speculatively")
    p.add_argument("--ckpt", required=True, metavar="PATH")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--mode", choices=("ar", "spec"), default="spec")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--draft-len", type=int, default=0, help="speculative tokens per step (0: n_future-1)")
    p.add_argument("--draft-precision", choices=("auto", "full", "int8"), default="auto",
                   help="weights the draft is computed with (auto: int8 on the CPU); the output does not change")
    p.add_argument("--verifier", choices=("marginal", "lm_head"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="decode all --max-new-tokens instead of stopping at the tokenizer's end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    add_tree_arguments(p)
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("bench", help="AR vs speculative decoding of the same prompts, side by side")
    p.add_argument("--ckpt", required=True, metavar="PATH")
    p.add_argument("--prompts", default="val", metavar="val|FILE",
                   help="'val' (held-out windows of the checkpoint's corpus) or a text file, one prompt a line")
    p.add_argument("--n-prompts", type=int, default=8)
    # None tells a default from a value the user gave: defaults are clipped to the model's context
    p.add_argument("--prompt-len", type=int, default=None,
                   help=f"tokens per held-out prompt (default {BENCH_PROMPT_LEN}, less when the context is shorter)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default {BENCH_MAX_NEW_TOKENS}, less when the context is shorter")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--draft-len", type=int, default=0)
    p.add_argument("--draft-precision", choices=("auto", "full", "int8"), default="auto",
                   help="weights the draft is computed with (auto: int8 on the CPU); the output does not change")
    p.add_argument("--verifier", choices=("marginal", "lm_head"), default=None)
    p.add_argument("--sampled", action="store_true",
                   help="also measure sampled acceptance (of the chain, and of sampled trees with --tree)")
    p.add_argument("--temperature", type=float, default=1.0, help="the temperature of --sampled (> 0)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="decode all --max-new-tokens instead of stopping each row at the end-of-sequence token")
    p.add_argument("--repeats", type=int, default=3,
                   help="run the AR and speculative decodes this many times, interleaved; report the medians")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON here (and a PNG beside it)")
    add_tree_arguments(p)
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("sweep", help="one run per grid point (e.g. rank), each measured, and a report")
    p.add_argument("--config", required=True, metavar="FILE", help="sweep file (conf/sweep_rank.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="sweep.* keys change the sweep (sweep.root=DIR); other keys apply to every run")
    p.add_argument("--quick", action="store_true", help="the sweep's small, fast variant")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished points")
    p.add_argument("--debug", action="store_true")

    from mtp_lightning.experiments import bench_train

    p = sub.add_parser("bench-train", help="training step time and peak memory: next-token vs CP, naive vs "
                                           "lean loss, per vocabulary")
    bench_train.add_arguments(p)
    p.add_argument("--debug", action="store_true")
    return parser


def _quiet_libraries() -> None:
    """Lightning and torch print many advisory warnings; a user running a preset does not need them."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_config_early(args: argparse.Namespace) -> None:
    """Report config mistakes before torch and Lightning are imported: a typo then costs well under a
    second instead of those imports' 15-20 s. A run continued from a checkpoint file takes its values
    from that file, so only keys and types can be checked before it is read."""
    from mtp_lightning.config import load_config

    from_file = getattr(args, "resume", None) not in (None, "last") or getattr(args, "ckpt", None) is not None
    load_config(args.config, args.overrides, check_values=not from_file)


def no_spin_threads() -> None:
    """OpenMP threads that busy-wait between parallel regions (the default) hold their cores even when
    idle; on a machine shared with other work that made the same decode take 2 s or 58 s. PASSIVE
    threads sleep instead. It must be in the environment before torch starts its OpenMP runtime, so
    ``main`` calls this before anything imports torch; a value the user set is kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run(args: argparse.Namespace) -> int:
    if args.command == "fit":
        if not args.config and not args.resume:
            from mtp_lightning.config import DEFAULT_RECIPE

            args.config = [str(DEFAULT_RECIPE)]  # `fit` with no --config: the embedded default run
        if args.print_config:
            return _print_config(args)
        check_config_early(args)
        from mtp_lightning.training.train import fit

        overrides = [*args.overrides, "trainer.progress_bar=false"] if args.quiet else args.overrides
        run_dir, stop = fit(args.config, overrides, args.resume, quiet=args.quiet)
        if stop.received is not None:
            print(f"stopped by signal {stop.received} at step {stop.stopped_at}; checkpoint "
                  f"{stop.checkpoint_path}. Continue with: python -m mtp_lightning fit --resume last "
                  f"run.name={run_dir.name} run.root={run_dir.parent}", file=sys.stderr)
            return 128 + int(stop.received)
        return 0
    if args.command in ("validate", "test"):
        if args.print_config:
            return _print_config(args)
        check_config_early(args)
        from mtp_lightning.training.train import evaluate

        results = evaluate(args.command, args.config, args.overrides, args.ckpt)
        for key, value in sorted(results[0].items()):
            print(f"{key:40s} {value:.4f}")
        return 0
    if args.command == "sweep":
        from mtp_lightning.experiments.sweep import run_sweep

        run_sweep(args.config, args.overrides, quick=args.quick, report_only=args.report_only)
        return 0
    if args.command == "bench-train":
        from mtp_lightning.experiments import bench_train

        return bench_train.run(args)
    from mtp_lightning import decode_cli

    return decode_cli.generate(args) if args.command == "generate" else decode_cli.bench(args)


def _print_config(args) -> int:
    from mtp_lightning.config import load_config, to_applied_yaml

    print(to_applied_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come after options (`fit --config a.yaml --resume last trainer.max_steps=9`)
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "bench":
        no_spin_threads()
    if not args.debug:
        _quiet_libraries()
    try:
        return run(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


