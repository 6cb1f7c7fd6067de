"""Shared fixtures: hypothesis profiles, and the optimality-gap report printed after the run."""
from __future__ import annotations

import os

# aqlm 1.1.7's CPU kernel accumulates into shared outputs inside numba's prange: with more than one
# thread its results are wrong. numba reads this at import, so it is set before anything imports it.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
# The package's cache (tokens, GGUF conversions, perplexities) goes to a folder of this test session, so
# that no test reads what an earlier run left (set before llm.data reads it at import).
if "PVTUNING_CACHE" not in os.environ:
    import tempfile

    os.environ["PVTUNING_CACHE"] = tempfile.mkdtemp(prefix="pvtuning-test-cache-")

import numpy as np
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (read when triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
settings.register_profile("ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from strategies import OPTIMALITY_GAPS  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if not OPTIMALITY_GAPS:
        return
    terminalreporter.section("PV optimality gap vs global optimum (tiny instances)")
    by_label: dict = {}
    for label, gap in OPTIMALITY_GAPS:
        by_label.setdefault(label, []).append(gap)
    for label, gaps in sorted(by_label.items()):
        g = np.array(gaps)
        terminalreporter.write_line(
            f"{label:32s} n={len(g):3d}  optimal {np.mean(g <= 1e-6):5.0%}  "
            f"median gap {np.median(g):.2e}  max gap {g.max():.2e}")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with the reason, where no CUDA GPU is present."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run these on the device)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
