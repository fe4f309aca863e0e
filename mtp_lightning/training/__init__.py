"""Training: the LightningModule, the ``fit``/``validate``/``test`` runs, and the multi-process strategies.

Nothing outside training imports this package; decoding and the experiment tools load checkpoints
through ``mtp_lightning.checkpoints``."""
