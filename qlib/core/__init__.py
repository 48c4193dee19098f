"""The ground floor: what every other qlib module may use and which imports nothing of qlib.

errors (QlabError) · io (atomic file and folder writes) · paths (repo, results, outputs, cache; staged runs) ·
device (CUDA or CPU, compute dtype, T4 conditions, seeding) · pip (installing a package at run time)."""

__version__ = "0.1.0"  # the package version (pyproject.toml says the same; run metadata records it)
