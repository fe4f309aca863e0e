"""Lightning callbacks of mtp_lightning, installed as ``mtp_lightning.callbacks`` (pyproject.toml maps
this folder there, so no top-level ``callbacks`` package is installed). Each is a thin shell over a
pure function of the package."""

from mtp_lightning.callbacks.acceptance import SpecAcceptanceCallback
from mtp_lightning.callbacks.health import MixtureHistogramCallback
from mtp_lightning.callbacks.progress import ProgressLines
from mtp_lightning.callbacks.safety import GracefulStopCallback

__all__ = ["GracefulStopCallback", "MixtureHistogramCallback", "ProgressLines", "SpecAcceptanceCallback"]
