"""Lightning callbacks of mtp_lightning. Each is a thin shell over a pure function of the package."""

from callbacks.acceptance import SpecAcceptanceCallback

__all__ = ["SpecAcceptanceCallback"]
