"""mtp_lightning: rank-r CP multi-token heads and self-speculative decoding, on PyTorch Lightning."""

__version__ = "0.1.0"
