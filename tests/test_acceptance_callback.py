"""The speculative-acceptance callback in a real Lightning trainer: it decodes every N validations in
eval and inference mode, logs the spec/ scalars and the teacher-forced estimate, and ModelCheckpoint can
select by mean acceptance length; at the end of the run it times AR against speculative decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mtp_lightning.config import TreeConfig
from mtp_lightning.decoding import SpecAcceptance, generate_speculative

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(decoding_model):
    """A LightningModule around a tiny decoding model: next-token loss of the verifier, SGD."""
    import lightning.pytorch as pl

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

    return Module()


def _data():
    """Eight random windows, for training, validation and the held-out prompts."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    class Data(pl.LightningDataModule):
        windows = torch.randint(0, 50, (8, 20), generator=torch.Generator().manual_seed(0))  # (B, T + n_future)

        def train_dataloader(self):
            return DataLoader(self.windows, batch_size=4)

        def val_dataloader(self):
            return DataLoader(self.windows, batch_size=4)

        def val_prompts(self, n, length):
            return self.windows[:n, :length]

    return Data()


@pytest.mark.parametrize("tree", [None, TreeConfig(enabled=True)])
def test_callback_logs_acceptance_in_a_real_trainer(decoding_model, tmp_path, monkeypatch, tree):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    import mtp_lightning.callbacks.acceptance as acceptance
    from mtp_lightning.callbacks import SpecAcceptanceCallback

    decodes, results = [], []

    def spy(model, *args, **kwargs):
        decodes.append((model.training, torch.is_inference_mode_enabled()))
        results.append(generate_speculative(model, *args, **kwargs))
        return results[-1]

    monkeypatch.setattr(acceptance, "generate_speculative", spy)

    cb = SpecAcceptanceCallback(every_n_val=2, n_prompts=3, prompt_len=6, max_new_tokens=8, sampled=True,
                                tree=tree)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="spec/mean_acceptance_length", mode="max")
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, val_check_interval=1, limit_val_batches=1,
                         num_sanity_val_steps=1, logger=TensorBoardLogger(tmp_path), callbacks=[cb, ckpt],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_module(decoding_model), datamodule=_data())
    assert cb._validations == 3  # the sanity check is not counted
    # validations 1 and 3, greedy and sampled (trees: one decode per prompt), in eval + inference mode
    greedy = 1 if tree is None else 3
    assert decodes == [(False, True)] * 2 * 2 * greedy
    metrics = trainer.callback_metrics
    for key in ["spec/acceptance_rate", "spec/mean_acceptance_length", "spec/acceptance_rate_pos1",
                "spec/acceptance_rate_pos3", "spec/sampled_mean_acceptance_length",
                "spec/tf_mean_acceptance_length",
                "spec/tf_acceptance_rate"]:
        assert key in metrics, key
    # the logged tau is that of the last greedy decode (validation 3; the sampled one comes after it)
    last_greedy, last_sampled = SpecAcceptance(3), SpecAcceptance(3)
    for result in results[-2 * greedy:-greedy]:
        last_greedy.update(*result.step_counts())
    for result in results[-greedy:]:
        last_sampled.update(*result.step_counts())
    assert float(metrics["spec/mean_acceptance_length"]) == pytest.approx(
        float(last_greedy.summary()["mean_acceptance_length"]))
    assert float(metrics["spec/sampled_mean_acceptance_length"]) == pytest.approx(
        float(last_sampled.summary()["mean_acceptance_length"]))
    # with spec.tree the sampled measurement verifies sampled trees too
    assert all(hasattr(r, "tree_sizes") == (tree is not None) for r in results)
    assert ckpt.best_model_score is not None
    events = list(tmp_path.glob("lightning_logs/version_0/events.out.tfevents.*"))
    assert events
    if tree is not None:
        assert "spec/tree_mean_size" in metrics and "spec/sampled_tree_mean_size" in metrics
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tags = EventAccumulator(str(events[0])).Reload().Tags()["histograms"]
        assert {"spec/tree_winner", "spec/accepted_per_step", "spec/sampled_tree_winner",
                "spec/sampled_accepted_per_step"} <= set(tags)


def _timed_fit(decoding_model, tmp_path, monkeypatch, tree=None, time_speedup=True, **trainer_kw):
    """A fit with the callback (every 2nd validation), the steps at which ``run_benchmark`` and greedy
    acceptance decoding ran, the benchmark's results, the trainer and its TensorBoard scalars."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import mtp_lightning.callbacks.acceptance as acceptance
    from mtp_lightning.callbacks import SpecAcceptanceCallback
    from mtp_lightning.decoding.bench import run_benchmark

    timed, decoded, results = [], [], []

    def bench_spy(*args, **kwargs):
        timed.append(trainer.global_step)
        results.append((args, kwargs, run_benchmark(*args, **kwargs)))
        return results[-1][2]

    def decode_spy(model, *args, **kwargs):
        decoded.append(trainer.global_step)
        return generate_speculative(model, *args, **kwargs)

    monkeypatch.setattr(acceptance, "run_benchmark", bench_spy)
    monkeypatch.setattr(acceptance, "generate_speculative", decode_spy)
    cb = SpecAcceptanceCallback(every_n_val=2, n_prompts=2, prompt_len=6, max_new_tokens=8, tree=tree,
                                time_speedup=time_speedup)
    trainer = pl.Trainer(accelerator="cpu", limit_val_batches=1, num_sanity_val_steps=0,
                         logger=TensorBoardLogger(tmp_path), callbacks=[cb], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, **trainer_kw)
    trainer.fit(_module(decoding_model), datamodule=_data())
    (events,) = tmp_path.glob("lightning_logs/version_0/events.out.tfevents.*")
    acc = EventAccumulator(str(events)).Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return timed, decoded, results, trainer, scalars


def _check_speedup(metrics, result, tree):
    spec_tps = result["tree_tokens_per_s" if tree else "spec_tokens_per_s"]
    assert metrics["spec/ar_tokens_per_s"].item() == result["ar_tokens_per_s"]
    assert metrics["spec/spec_tokens_per_s"].item() == spec_tps
    # float64 all the way: the logged ratio is exactly that of the logged rates
    logged = {key: metrics[f"spec/{key}"].item() for key in ("speedup", "spec_tokens_per_s", "ar_tokens_per_s")}
    assert logged["speedup"] == logged["spec_tokens_per_s"] / logged["ar_tokens_per_s"]
    assert result["identical"] and result.get("tree_identical", True)
    assert metrics["spec/identical"].item() == 1.0


@pytest.mark.parametrize("tree", [None, TreeConfig(enabled=True)])
def test_speedup_is_timed_at_the_last_validation_only(decoding_model, tmp_path, monkeypatch, tree):
    timed, decoded, results, trainer, scalars = _timed_fit(decoding_model, tmp_path, monkeypatch, tree=tree,
                                                           max_steps=4, val_check_interval=1)
    assert timed == [4]  # validations after steps 1 to 4: only the last one times the decoders
    greedy = 1 if tree is None else 2  # trees decode one prompt at a time
    # acceptance every 2nd validation (1 and 3), and at the last one although every_n_val skips it
    assert decoded == [1] * greedy + [3] * greedy + [4] * greedy
    (args, kwargs, result), = results
    assert args[1] == _data().windows[:2, :6].tolist() and args[2] == 8
    assert kwargs["batch_size"] == 1 and kwargs["repeats"] == 1 and kwargs["tree"] == tree
    _check_speedup(trainer.callback_metrics, result, tree is not None)
    # TensorBoard: once, at Lightning's step of that validation
    assert [step for step, _ in scalars["spec/speedup"]] == [3]
    assert scalars["spec/identical"] == [(3, 1.0)]


def test_speedup_is_timed_when_training_ends_between_validations(decoding_model, tmp_path, monkeypatch):
    import mtp_lightning.callbacks.acceptance as acceptance

    monkeypatch.setattr(acceptance, "machine_load", lambda: (9.5, 2))  # as bench, a loaded machine is named
    with pytest.warns(UserWarning, match=r"SpecAcceptanceCallback: spec/speedup is doubtful: the machine was "
                                         r"loaded before the run \(1-minute load average 9.50 on 2 cores\)"):
        timed, decoded, results, trainer, scalars = _timed_fit(decoding_model, tmp_path, monkeypatch,
                                                               max_steps=3, val_check_interval=2)
    assert timed == [3] and decoded == [2, 3]  # the validation after step 2, then the end of training
    _check_speedup(trainer.callback_metrics, results[0][2], False)
    assert [step for step, _ in scalars["spec/speedup"]] == [2]  # where a validation after step 3 logs
    assert [step for step, _ in scalars["spec/mean_acceptance_length"]] == [1, 2]


def test_time_speedup_false_never_times(decoding_model, tmp_path, monkeypatch):
    timed, decoded, _, trainer, scalars = _timed_fit(decoding_model, tmp_path, monkeypatch, time_speedup=False,
                                                     max_steps=3, val_check_interval=1)
    assert timed == [] and decoded == [1, 3]
    assert "spec/speedup" not in trainer.callback_metrics and "spec/speedup" not in scalars
