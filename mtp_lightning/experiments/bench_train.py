"""``python -m mtp_lightning bench-train``: what a training step costs, in time and peak memory.

Rows, all on the same trunk and the same batch x time tokens (random ids: the cost does not depend on
them), at each vocabulary asked for:
- ``ntp``: plain next-token training, ``cross_entropy(z @ U^T, y)`` with the whole logits tensor;
- ``ntp-lean``: the same loss through the chunked ``target_logprob``;
- CP heads at each (n, r), with the ``naive`` loss (every n*r logits tensor held) and the ``lean`` one;
- with ``--draft-vocab V'``, a ``lean`` row per (n, r) whose heads predict over a draft vocabulary of
  V' ids plus "other" (``model.heads.draft_vocab``, ``model/draft_vocab.py``): products V' + 1 wide.

``--heads-only`` benchmarks heads-only training on a frozen trunk, as ``model.backbone.train_mode=
heads_only`` trains: the trunk runs without autograd and has no optimizer state, U gets no gradient,
and only the ``lean`` rows run (the next-token and naive rows train a trunk). The trunk is this
project's GPT at ``--layers``: its forward is part of ``step_s``, the heads and loss are ``loss_s``.

A step is forward, backward and an AdamW update. Each row runs in a fresh process, so its peak
resident memory (``ru_maxrss``) is its own; glibc is told to return every block of 64 KiB or more to
the system when it is freed (``MALLOC_MMAP_THRESHOLD_``), so the high-water mark follows live tensors.
``step_peak_mib`` is that peak minus the resident memory just before the model was built: the model,
its gradients and optimizer state, the batch and the step's activations. The backward pass is split
at the trunk's output (detached leaves), which times the heads and loss (``loss_s``) apart from the
trunk with no extra work.

FLOP floor: the n*r unembedding products of a step cost at least 3 * 2*N*V*D each (the logits, then
the gradients of h and of U), 6*n*r*N*V*D in all; the lean loss does one more product per chunk (the
recomputed logits), 8*n*r*N*V*D (6*n*r*N*V*D again with ``--heads-only``, where U needs no gradient).
V is the products' width: V' + 1 for a draft vocabulary. ``floor_s`` is the floor at the matmul rate
measured in the same process on the products' own shape ((1024, D) @ (D, V) on a CPU, N rows on a
GPU); ``floor_s / loss_s`` is how close the loss gets to it, and ``step_over_floor`` = ``step_s / floor_s`` is the whole
step (trunk, heads, loss, update) as a multiple of it.

On a GPU (``--device cuda``) the model and the batch live there, steps are timed between
``torch.cuda.synchronize()`` calls, and ``step_peak_mib`` is ``torch.cuda.max_memory_allocated()``
(peak statistics reset just before the model is built) less what was allocated then: the same things,
counted by the caching allocator. Each row says which peak it holds (``peak_kind``: ``rss`` or
``cuda_max_allocated``). The floor's matmul rate is then measured on the GPU, with the batch's N rows.

``--precision bf16-mixed`` runs forward and loss under ``torch.autocast(dtype=bfloat16)``, as
Lightning's bf16-mixed does. The unembedding products then run in bf16 for the full-logits and naive
losses (autocast), but the lean loss turns autocast off and multiplies in float32 unless
``--bf16-unembed`` (the loss config's ``bf16_unembed``); the floor's rate is measured in the dtype
the row's products run in (``matmul_dtype``).

``--strategy ddp|fsdp`` wraps the model as training on several processes does, in a one-process group
(NCCL on a GPU, gloo on a CPU): ``DistributedDataParallel``, or FSDP2 ``fully_shard`` per transformer
block and then the root (``distributed.prepare_model``). DDP runs with ``static_graph=True``: the
split backward gives the tied U its gradient in two backward calls (the loss's, then the embedding's),
which plain DDP refuses as "marked ready twice" and a static graph counts and reduces once. FSDP2
needs nothing special: it keeps the root unsharded from forward to backward, so the loss's U is the full
one and its gradient joins the root's reduce-scatter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

from mtp_lightning.atomic import write_text

WORKER_FLAG = "--worker"


# ---- one row, in its own process ----------------------------------------------------------------

def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _matmul_gflops(d: int, vocab: int, rows: int = 1024, reps: int = 5, device: str = "cpu",
                   dtype: str = "float32") -> float:
    """GFLOP/s of (rows, D) @ (D, V) here, the shape of the loss's products, in the products' dtype on
    the row's device: the best of a few tries, so that other jobs on the machine make the floor
    stricter, never looser. On a GPU each try is 10 products between synchronisations."""
    import torch

    dt = getattr(torch, dtype)
    cuda = device == "cuda"
    inner = 10 if cuda else 1
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    h, U = torch.randn(rows, d, device=device, dtype=dt), torch.randn(vocab, d, device=device, dtype=dt)
    out = torch.empty(rows, vocab, device=device, dtype=dt)
    torch.matmul(h, U.T, out=out)
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            torch.matmul(h, U.T, out=out)
        sync()
        best = min(best, (time.perf_counter() - t) / inner)
    return 2 * rows * vocab * d / best / 1e9


def products_dtype(spec: dict) -> str:
    """The dtype the row's unembedding products run in: bf16 under bf16-mixed for the full-logits and
    naive losses (autocast), and for the lean ones only with ``bf16_unembed`` (they turn autocast off)."""
    if spec.get("precision", "32-true") != "bf16-mixed":
        return "float32"
    return "bfloat16" if spec["kind"] in ("ntp", "naive") or spec.get("bf16_unembed") else "float32"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(device: str) -> None:
    """A one-process group: NCCL on a GPU, gloo on a CPU."""
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    if device == "cuda":
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)


def run_row(spec: dict) -> dict:
    """One setting: build, warm up, time. Returns the row (also printed as JSON by the worker).

    A tiny copy of the setting runs first, so the libraries' code pages and thread pools (on a GPU:
    the kernels, the cuBLAS workspace) are already there when the memory before the model is read: the
    peak then counts tensors, not code."""
    import torch

    device, strategy = spec.get("device", "cpu"), spec.get("strategy", "none")
    if device == "cuda":
        torch.cuda.set_device(0)
    if strategy != "none":
        _init_group(device)
    try:
        tiny = {**spec, "batch": 2, "seq": 8, "vocab": 64, "d_model": 2 * spec["heads"], "warmup": 0, "steps": 1,
                **({"draft_vocab": 32} if spec.get("draft_vocab") else {})}
        _time_steps(tiny)
        step_s, loss_s, before = _time_steps(spec)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
            extra = {"peak_kind": "cuda_max_allocated", "peak_cuda_mib": peak}
        else:
            peak, extra = peak_rss, {"peak_kind": "rss"}
        B, T, V, D, n, r = spec["batch"], spec["seq"], spec["vocab"], spec["d_model"], spec["n"], spec["r"]
        products = 1 if spec["kind"].startswith("ntp") else n * r
        width = spec["draft_vocab"] + 1 if spec.get("draft_vocab") else V  # the products' width
        floor = 6.0 * products * B * T * width * D
        dtype = products_dtype(spec)
        rate = _matmul_gflops(D, width, rows=B * T if device == "cuda" else 1024, device=device, dtype=dtype)
    finally:
        if strategy != "none":
            torch.distributed.destroy_process_group()
    return {**spec, "products": products, "step_s": step_s, "loss_s": loss_s, "tokens_per_s": B * T / step_s,
            "peak_rss_mib": peak_rss, "step_peak_mib": peak - before, **extra, "matmul_dtype": dtype,
            "matmul_gflops": rate, "product_width": width, "floor_gflop": floor / 1e9, "floor_s": floor / 1e9 / rate,
            "floor_over_loss": floor / 1e9 / rate / loss_s, "step_over_floor": step_s / (floor / 1e9 / rate)}


def _time_steps(spec: dict) -> tuple[float, float, float]:
    """(fastest step s, its heads+loss s, MiB before the model was built: resident on a CPU,
    allocated on a GPU, where the peak statistics are reset there)."""
    import torch
    import torch.nn.functional as F

    from mtp_lightning.config import GPTConfig, HeadsConfig, LossConfig, ModelConfig
    from mtp_lightning.objectives.cp_loss import cp_objective, target_logprob
    from mtp_lightning.model.cp_model import CPModel
    from mtp_lightning.model.gpt import GPT

    device, strategy = spec.get("device", "cpu"), spec.get("strategy", "none")
    cuda = device == "cuda"
    bf16 = spec.get("precision", "32-true") == "bf16-mixed"
    bf16_unembed = bool(spec.get("bf16_unembed", False))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
    B, T, V, D = spec["batch"], spec["seq"], spec["vocab"], spec["d_model"]
    n, r, kind = spec["n"], spec["r"], spec["kind"]
    gpt = GPTConfig(n_layer=spec["layers"], n_head=spec["heads"], d_model=D, max_seq_len=T, vocab_size=V)
    if kind.startswith("ntp"):
        mcfg = ModelConfig(gpt=gpt)
        model = GPT(gpt)
    else:
        mcfg = ModelConfig(gpt=gpt, heads=HeadsConfig(n_future=n, rank=r, kind="mlp",
                                                      draft_vocab=spec.get("draft_vocab", 0)))
        model = CPModel(mcfg)
    heads_only = bool(spec.get("heads_only"))
    if heads_only:
        model.trunk.requires_grad_(False)
    loss_cfg = LossConfig(balance="switch", next_token_weight=0.0, lm_head_weight=0.0, position_fraction=1.0,
                          lean=kind == "lean", bf16_unembed=bf16_unembed)
    if device != "cpu":
        model.to(device)
    net = model  # what forward runs through; model keeps the unembedding and the heads
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[0] if cuda else None, static_graph=True)
    elif strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        from mtp_lightning.training.distributed import prepare_model

        prepare_model(model, mcfg, init_device_mesh(device, (1,), mesh_dim_names=("data_parallel",)))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    y = torch.randint(0, V, (B, T, max(n, 1)), generator=g)  # (B, T, n)
    if device != "cpu":
        x, y = x.to(device), y.to(device)
    amp = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        with amp:
            if kind.startswith("ntp"):
                z = net(x)  # (B, T, D)
                outs = [z]
            elif heads_only:  # the frozen trunk without autograd; only the heads learn
                with torch.no_grad():
                    z = model.trunk(x)  # (B, T, D)
                outs = [z, *model.heads.offset_states(z)]
            else:
                z, states = net(x)  # (B, T, D), n x (B, T, D)
                outs = [z, *states]
        leaves = [o.detach().requires_grad_() for o in outs]
        sync()
        t1 = time.perf_counter()
        with amp:
            if kind == "ntp":
                loss = F.cross_entropy((leaves[0] @ model.unembedding.T).view(B * T, V), y[..., 0].reshape(-1))
            elif kind == "ntp-lean":
                loss = -target_logprob(leaves[0].reshape(B * T, D), model.unembedding, y[..., 0].reshape(-1),
                                       bf16=bf16_unembed).mean()
            else:  # the heads' vocabulary: U itself, or the draft vocabulary's rows and "other"
                loss = cp_objective(model.heads, leaves[0], leaves[1:], model.head_unembedding(other=True),
                                    model.head_targets(y), loss_cfg, frozen_rows=model.head_frozen_rows).loss
        loss.backward()
        sync()
        t2 = time.perf_counter()
        backed = [(o, leaf.grad) for o, leaf in zip(outs, leaves) if o.requires_grad and leaf.grad is not None]
        if backed:
            torch.autograd.backward(*zip(*backed))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, t2 - t1

    for _ in range(spec["warmup"]):
        step()
    times = [step() for _ in range(spec["steps"])]
    return min(t for t, _ in times), min(t for _, t in times), before


def _worker() -> None:
    spec = json.loads(sys.argv[sys.argv.index(WORKER_FLAG) + 1])
    print(json.dumps(run_row(spec)))


# ---- the table ------------------------------------------------------------------------------------

def naive_bytes(spec: dict) -> int:
    """Float32 vocabulary-sized tensors the naive CP loss holds at its peak: the n*r saved
    log-softmax outputs, plus two more of one offset's size during its backward."""
    N, V, n, r = spec["batch"] * spec["seq"], spec["vocab"], spec["n"], spec["r"]
    return 4 * N * V * (n * r + 2 * r)


def build_specs(args) -> list[dict]:
    base = {"batch": args.batch, "seq": args.seq, "layers": args.layers, "heads": args.heads,
            "d_model": args.d_model, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
            "device": args.device, "precision": args.precision, "strategy": args.strategy}
    if args.bf16_unembed:
        base["bf16_unembed"] = True
    if args.heads_only:
        base["heads_only"] = True
    specs = []
    for V in args.vocab:
        if args.heads_only:  # a frozen trunk: the lean CP rows only, at V and at the draft vocabulary
            for nr in args.nr:
                n, r = (int(v) for v in nr.lower().split("x"))
                specs.append({**base, "vocab": V, "n": n, "r": r, "kind": "lean"})
                if args.draft_vocab:
                    specs.append({**base, "vocab": V, "n": n, "r": r, "kind": "lean", "draft_vocab": args.draft_vocab})
            continue
        specs.append({**base, "vocab": V, "n": 1, "r": 1, "kind": "ntp"})
        specs.append({**base, "vocab": V, "n": 1, "r": 1, "kind": "ntp-lean"})
        for nr in args.nr:
            n, r = (int(v) for v in nr.lower().split("x"))
            for kind in ("naive", "lean"):
                specs.append({**base, "vocab": V, "n": n, "r": r, "kind": kind})
            if args.draft_vocab:
                specs.append({**base, "vocab": V, "n": n, "r": r, "kind": "lean", "draft_vocab": args.draft_vocab})
    return specs


def run_specs(specs: list[dict], budget_gib: float, log=print, on_row=None) -> list[dict]:
    """Each spec in its own process; ``on_row(rows)`` (if given) is called after each row."""
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for spec in specs:
        label = f"V={spec['vocab']} {spec['kind']} n={spec['n']} r={spec['r']}" + \
            (f" V'={spec['draft_vocab']}" if spec.get("draft_vocab") else "")
        if spec["kind"] == "naive" and naive_bytes(spec) > budget_gib * 2**30:
            need = naive_bytes(spec) / 2**30
            row = {**spec, "skipped": f"naive loss would hold ~{need:.1f} GiB of logits "
                                      f"(> --mem-budget-gib {budget_gib:g})"}
            log(f"  {label}: skipped ({row['skipped']})")
        else:
            cmd = [sys.executable, "-m", "mtp_lightning.experiments.bench_train", WORKER_FLAG, json.dumps(spec)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
                row = {**spec, "skipped": f"failed: {tail}"}
                log(f"  {label}: failed ({tail})")
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                kind = " (CUDA allocated)" if row.get("peak_kind") == "cuda_max_allocated" else ""
                log(f"  {label}: {row['step_s']:.2f} s/step, peak {row['step_peak_mib']:.0f} MiB{kind}")
        rows.append(row)
        if on_row:
            on_row(rows)
    return rows


def summarise(rows: list[dict]) -> dict:
    """The issue's targets, from the measured rows."""
    done = [r for r in rows if "skipped" not in r]

    def find(V, kind, n=1, r=1):
        return next((x for x in done if x["vocab"] == V and x["kind"] == kind and x["n"] == n and x["r"] == r),
                    None)

    memory = []
    for row in done:
        base = find(row["vocab"], "ntp")
        if row["kind"] in ("lean", "naive") and base is not None:
            memory.append({"vocab": row["vocab"], "n": row["n"], "r": row["r"], "loss": row["kind"],
                           "ratio_to_ntp": row["step_peak_mib"] / base["step_peak_mib"],
                           "tokens": row["batch"] * row["seq"]})
    speed = []
    for row in done:
        if row["kind"] == "lean" and not row.get("draft_vocab"):
            naive = find(row["vocab"], "naive", row["n"], row["r"])
            if naive is not None:
                speed.append({"vocab": row["vocab"], "n": row["n"], "r": row["r"], "lean_s": row["step_s"],
                              "naive_s": naive["step_s"], "lean_le_naive": row["step_s"] <= naive["step_s"]})
    return {"memory_vs_ntp": memory, "lean_vs_naive": speed,
            "floor": [{"vocab": x["vocab"], "draft_vocab": x.get("draft_vocab", 0), "n": x["n"], "r": x["r"],
                       "loss": x["kind"], "floor_over_loss": x["floor_over_loss"],
                       "step_over_floor": x["step_over_floor"]} for x in done if x["kind"] in ("lean", "naive")]}


def format_table(rows: list[dict]) -> str:
    """One line per row. The peak column says what it counts when that is the GPU's allocator."""
    cuda = any(x.get("peak_kind") == "cuda_max_allocated" for x in rows)
    peak = "peak MiB (step, CUDA allocated)" if cuda else "peak MiB (step)"
    head = (f"| vocab | model | loss | step s | tokens/s | heads+loss s | {peak} | x ntp peak "
            "| floor GFLOP | floor / loss time | step / floor |")
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    ntp_peak = {x["vocab"]: x["step_peak_mib"] for x in rows if x["kind"] == "ntp" and "skipped" not in x}
    for x in rows:
        model = "next-token" if x["kind"].startswith("ntp") else f"CP n={x['n']} r={x['r']}"
        if x.get("draft_vocab"):
            model += f" V'={x['draft_vocab']}"
        if x.get("heads_only"):
            model += " heads-only"
        loss = {"ntp": "full logits", "ntp-lean": "lean", "naive": "naive", "lean": "lean"}[x["kind"]]
        if "skipped" in x:
            lines.append(f"| {x['vocab']} | {model} | {loss} | - | - | - | - | - | - | {x['skipped']} | - |")
            continue
        ratio = x["step_peak_mib"] / ntp_peak[x["vocab"]] if x["vocab"] in ntp_peak else float("nan")
        lines.append(f"| {x['vocab']} | {model} | {loss} | {x['step_s']:.2f} | {x['tokens_per_s']:,.0f} | "
                     f"{x['loss_s']:.2f} | {x['step_peak_mib']:,.0f} | {ratio:.2f} | {x['floor_gflop']:,.0f} | "
                     f"{x['floor_over_loss']:.2f} | {x['step_over_floor']:.2f} |")
    return "\n".join(lines)


def machine(threads: int = 0, device: str = "cpu", precision: str = "32-true", strategy: str = "none") -> dict:
    """``describe_machine()`` with the threads each row ran with, the rows' device, precision and
    strategy, and the GPU's memory and CUDA version when the rows ran there."""
    import torch

    from mtp_lightning.machine import describe_machine

    out = {**describe_machine(), "threads": threads or torch.get_num_threads(), "device": device,
           "precision": precision, "strategy": strategy}
    if device == "cuda":
        out["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        out["cuda"] = torch.version.cuda
    return out


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, every option spelled out."""
    parts = ["python -m mtp_lightning bench-train"]
    for key in ("vocab", "nr", "batch", "seq", "layers", "heads", "d_model", "warmup", "steps", "threads",
                "mem_budget_gib", "draft_vocab", "device", "precision", "strategy"):
        value = getattr(args, key)
        parts.append(f"--{key.replace('_', '-')} " + (" ".join(map(str, value)) if isinstance(value, list)
                                                       else str(value)))
    if args.bf16_unembed:
        parts.append("--bf16-unembed")
    if args.heads_only:
        parts.append("--heads-only")
    return " ".join(parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--nr", nargs="+", default=["2x2", "4x4", "4x8"], metavar="NxR", help="CP (n, r) settings")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    p.add_argument("--steps", type=int, default=1, help="timed steps per row (the fastest is kept)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--mem-budget-gib", type=float, default=8.0,
                   help="skip a naive row whose logits alone would exceed this")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the rows run (cuda: peak is torch.cuda.max_memory_allocated)")
    p.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true",
                   help="bf16-mixed: forward and loss under torch.autocast(bfloat16)")
    p.add_argument("--bf16-unembed", action="store_true",
                   help="the lean loss's products in bf16 too (LossConfig.bf16_unembed); else float32")
    p.add_argument("--strategy", choices=["none", "ddp", "fsdp"], default="none",
                   help="wrap the model in DDP or FSDP2 (per block, then root) in a one-process group")
    p.add_argument("--draft-vocab", type=int, default=0, metavar="V'",
                   help="also a lean row per NxR whose heads predict over V' ids plus 'other' (0: none)")
    p.add_argument("--heads-only", action="store_true",
                   help="a frozen trunk (no gradient, no optimizer state) and lean rows only")
    p.add_argument("--json", metavar="OUT", default="bench_train.json", help="where to write the results")


def run(args: argparse.Namespace) -> int:
    from mtp_lightning.errors import UserError

    bad = [nr for nr in args.nr if len(nr.lower().split("x")) != 2 or not all(v.isdigit() and int(v) > 0
                                                                              for v in nr.lower().split("x"))]
    if bad:
        raise UserError(f"--nr {bad[0]!r} is not of the form NxR with positive integers (e.g. 4x8)")
    if args.draft_vocab and not 0 < args.draft_vocab < min(args.vocab):
        raise UserError(f"--draft-vocab {args.draft_vocab} must be below every --vocab ({min(args.vocab)}), or 0")
    if min(args.vocab) < 2 or args.batch < 1 or args.seq < 2 or args.steps < 1 or args.d_model % args.heads:
        raise UserError("bench-train needs --vocab >= 2, --batch >= 1, --seq >= 2, --steps >= 1 and "
                        "--heads dividing --d-model")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("bench-train --device cuda but this machine has no CUDA GPU; use --device cpu")
        if args.precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
            raise UserError("bench-train --precision bf16-mixed but this GPU has no bf16; use 32-true")
    specs = build_specs(args)
    setting = "" if (args.device, args.precision, args.strategy) == ("cpu", "32-true", "none") else \
        f", {args.device} {args.precision} strategy={args.strategy}"
    print(f"bench-train: {len(specs)} rows, {args.batch} x {args.seq} tokens, {args.layers} layers, "
          f"d={args.d_model}{setting}", file=sys.stderr)
    head = {"command": command_line(args), "machine": machine(args.threads, args.device, args.precision,
                                                                args.strategy)}

    def partial(rows: list[dict]) -> None:  # so that a run cut short still leaves the rows it finished
        write_text(args.json, json.dumps({**head, "partial": True, "rows": rows}, indent=1))

    rows = run_specs(specs, args.mem_budget_gib, log=lambda s: print(s, file=sys.stderr), on_row=partial)
    result = {**head, "rows": rows, "targets": summarise(rows)}
    print(format_table(rows))
    write_text(args.json, json.dumps(result, indent=1))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__" and WORKER_FLAG in sys.argv:
    _worker()
