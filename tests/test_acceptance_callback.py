"""The speculative-acceptance callback in a real Lightning trainer: it decodes every N validations in
eval and inference mode, logs the spec/ scalars and the teacher-forced estimate, and ModelCheckpoint can
select by mean acceptance length."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mtp_lightning.config import TreeConfig
from mtp_lightning.decoding import SpecAcceptance, generate_speculative

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("tree", [None, TreeConfig(enabled=True)])
def test_callback_logs_acceptance_in_a_real_trainer(decoding_model, tmp_path, monkeypatch, tree):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    import mtp_lightning.callbacks.acceptance as acceptance
    from mtp_lightning.callbacks import SpecAcceptanceCallback

    decodes, results = [], []

    def spy(model, *args, **kwargs):
        decodes.append((model.training, torch.is_inference_mode_enabled()))
        results.append(generate_speculative(model, *args, **kwargs))
        return results[-1]

    monkeypatch.setattr(acceptance, "generate_speculative", spy)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = decoding_model()

        def _loss(self, window):
            z, states = self.model(window[:, :16])
            logp = self.model.verifier_logprobs(z, states, "marginal")  # (B, 16, V)
            return nn.functional.nll_loss(logp.flatten(0, 1), window[:, 1:17].flatten())

        def training_step(self, batch, batch_idx):
            return self._loss(batch)

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Data(pl.LightningDataModule):
        windows = torch.randint(0, 50, (8, 20))  # (B, T + n_future)

        def train_dataloader(self):
            return DataLoader(self.windows, batch_size=4)

        def val_dataloader(self):
            return DataLoader(self.windows, batch_size=4)

        def val_prompts(self, n, length):
            return self.windows[:n, :length]

    cb = SpecAcceptanceCallback(every_n_val=2, n_prompts=3, prompt_len=6, max_new_tokens=8, sampled=True,
                                tree=tree)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="spec/mean_acceptance_length", mode="max")
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, val_check_interval=1, limit_val_batches=1,
                         num_sanity_val_steps=1, logger=TensorBoardLogger(tmp_path), callbacks=[cb, ckpt],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(), datamodule=Data())
    assert cb._validations == 3  # the sanity check is not counted
    # validations 1 and 3, greedy (trees: one decode per prompt) and sampled, in eval + inference mode
    greedy = 1 if tree is None else 3
    assert decodes == [(False, True)] * 2 * (greedy + 1)
    metrics = trainer.callback_metrics
    for key in ["spec/acceptance_rate", "spec/mean_acceptance_length", "spec/acceptance_rate_pos1",
                "spec/acceptance_rate_pos3", "spec/sampled_mean_acceptance_length",
                "spec/tf_mean_acceptance_length",
                "spec/tf_acceptance_rate"]:
        assert key in metrics, key
    # the logged tau is that of the last greedy decode (validation 3; the sampled one comes after it)
    last_greedy = SpecAcceptance(3)
    for result in results[-1 - greedy:-1]:
        last_greedy.update(*result.step_counts())
    assert float(metrics["spec/mean_acceptance_length"]) == pytest.approx(
        float(last_greedy.summary()["mean_acceptance_length"]))
    assert ckpt.best_model_score is not None
    events = list(tmp_path.glob("lightning_logs/version_0/events.out.tfevents.*"))
    assert events
    if tree is not None:
        assert "spec/tree_mean_size" in metrics
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tags = EventAccumulator(str(events[0])).Reload().Tags()["histograms"]
        assert "spec/tree_winner" in tags and "spec/accepted_per_step" in tags
