"""Decoding: KV-cached autoregressive baseline, CP self-speculative decoding, acceptance metrics,
a teacher-forced acceptance estimate and a benchmark. Pure PyTorch; nothing here imports Lightning."""

from mtp_lightning.decoding.autoregressive import Generation, generate_ar, left_pad
from mtp_lightning.decoding.bench import format_table, plot_per_position, run_benchmark
from mtp_lightning.decoding.metrics import SpecAcceptance
from mtp_lightning.decoding.sampling import GREEDY, Sampling
from mtp_lightning.decoding.speculative import SpecGeneration, generate_speculative
from mtp_lightning.decoding.teacher_forced import teacher_forced_acceptance

__all__ = ["GREEDY", "Generation", "Sampling", "SpecAcceptance", "SpecGeneration", "format_table",
           "generate_ar", "generate_speculative", "left_pad", "plot_per_position", "run_benchmark",
           "teacher_forced_acceptance"]
