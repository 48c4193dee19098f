"""Tests run offline and in the smoke profile; nbval's kernels inherit this environment."""
import os

os.environ["QLAB_PROFILE"] = "smoke"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
