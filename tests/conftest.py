"""Test setup: offline Hugging Face, and caches in one temporary folder shared by every test."""

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="mtp_lightning_tests_")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_TMP, "hf_home")
os.environ["MTP_LIGHTNING_CACHE"] = os.path.join(_TMP, "cache")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
