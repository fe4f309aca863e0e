"""Lightning callbacks of mtp_lightning. Each is a thin shell over a pure function of the package."""

from callbacks.acceptance import SpecAcceptanceCallback
from callbacks.health import MixtureHistogramCallback
from callbacks.progress import ProgressLines
from callbacks.safety import GracefulStopCallback

__all__ = ["GracefulStopCallback", "MixtureHistogramCallback", "ProgressLines", "SpecAcceptanceCallback"]
