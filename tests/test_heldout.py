"""Held-out bits per byte: the formula on a hand computation, and the evaluation loop against a direct
computation from the model's next-token distribution, with no random draw."""

import math
from types import SimpleNamespace

import pytest
import torch

from mtp_lightning.objectives.heldout import bits_per_byte, heldout_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bits_per_byte_by_hand():
    # two tokens of 1 and 3 bytes, predicted with probabilities 1/2 and 1/4: 1 + 2 bits over 4 bytes
    assert bits_per_byte(-math.log(1 / 2) - math.log(1 / 4), 1 + 3) == pytest.approx(0.75, rel=1e-12)
    assert bits_per_byte(torch.tensor(3 * math.log(2)), torch.tensor(4.0)).item() == pytest.approx(0.75)
    assert bits_per_byte(math.log(2), 0) == pytest.approx(1.0)  # no bytes: divided by 1, not by 0


class _Data:
    """What ``heldout_metrics`` reads from a DataModule: the tokenizer's bytes per id and val windows."""

    def __init__(self, windows, token_bytes):
        self.windows, self.tokenizer = windows, SimpleNamespace(token_bytes=lambda: token_bytes)

    def val_dataloader(self):
        return list(self.windows.split(2))


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_heldout_metrics_equal_a_direct_computation_and_draw_nothing(decoding_model, fraction):
    model = decoding_model(vocab=20, n_future=3, rank=2)
    model.cfg.loss.position_fraction = fraction  # training's position subset must not reach evaluation
    windows = torch.randint(0, 20, (5, 11), generator=torch.Generator().manual_seed(0))  # (B, T + n)
    token_bytes = torch.arange(20) % 4 + 1  # (V,) 1..4 bytes per token
    expected_nats, expected_bytes = 0.0, 0
    with torch.no_grad():
        for w in windows.split(2):
            inputs, nxt = w[:, :8], w[:, 1:9]  # (B, 8): T = 11 - n_future
            z, states = model(inputs)
            logp = model.verifier_logprobs(z, states, "marginal")  # (B, 8, V)
            expected_nats -= float(logp.gather(-1, nxt[..., None]).sum())
            expected_bytes += int(token_bytes[nxt].sum())
    rng = torch.get_rng_state()
    m = heldout_metrics(model, _Data(windows, token_bytes), max_batches=10)
    assert torch.equal(torch.get_rng_state(), rng)
    assert m["heldout_positions"] == 5 * 8 and m["heldout_bytes"] == expected_bytes
    assert m["bits_per_byte"] == pytest.approx(expected_nats / math.log(2) / expected_bytes, rel=1e-5)
    assert m["next_token_nll"] == pytest.approx(expected_nats / 40, rel=1e-5)
    # batches of 2, 2 and 1 windows: max_batches=1 reads the first only
    assert heldout_metrics(model, _Data(windows, token_bytes), max_batches=1)["heldout_positions"] == 2 * 8
