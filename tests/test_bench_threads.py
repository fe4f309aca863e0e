"""``bench`` puts OMP_WAIT_POLICY=PASSIVE in the environment before torch starts its OpenMP runtime
(which reads it once, at start-up), and keeps a value the user set. Checked in a fresh process with an
import hook that records the variable at the moment torch is first imported."""

import os
import subprocess
import sys

import pytest

PROBE = r"""
import importlib.abc, os, sys

seen = []

class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY", "<unset>"))
        return None

sys.meta_path.insert(0, Spy())
from mtp_lightning.cli import main

code = main(sys.argv[1:])
print(f"{code} {seen[0] if seen else '<torch never imported>'}")
"""


def _policy_when_torch_starts(args: list[str], env_policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True,
                         timeout=120)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("env_policy,want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_bench_sets_a_passive_thread_policy_before_torch_starts(tmp_path, env_policy, want):
    missing = str(tmp_path / "missing.ckpt")  # bench imports torch, then refuses the path: exit 2
    assert _policy_when_torch_starts(["bench", "--ckpt", missing], env_policy) == f"2 {want}"


def test_other_commands_leave_the_thread_policy_alone(tmp_path):
    missing = str(tmp_path / "missing.ckpt")
    assert _policy_when_torch_starts(["generate", "--ckpt", missing, "--prompt", "x"], None) == "2 <unset>"
