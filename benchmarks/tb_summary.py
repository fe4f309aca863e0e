"""Print the last value (and step) of the headline scalars of a run directory's TensorBoard files.

    python benchmarks/tb_summary.py runs/default
"""

import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = ("train/loss", "val/loss", "val/bits_per_byte", "val/next_token_nll", "train/device/items_per_sec",
        "spec/mean_acceptance_length", "spec/acceptance_rate", "spec/tf_mean_acceptance_length")


def main(run_dir: str) -> None:
    values: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(run_dir).rglob("events.out.tfevents*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    print(f"{run_dir}: {len(values)} scalar tags")
    for tag in TAGS:
        if tag in values:
            steps = sorted(values[tag])
            print(f"  {tag:34s} last {steps[-1][1]:.4f} at step {steps[-1][0]}  ({len(steps)} points, "
                  f"steps {steps[0][0]}..{steps[-1][0]})")
    ckpts = sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir()) if (Path(run_dir) / "checkpoints").is_dir() else []
    print(f"  checkpoints: {ckpts}")


if __name__ == "__main__":
    main(sys.argv[1])
