import os
import tempfile

# The Triton backend runs on CPU tensors only under the interpreter; set it before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh Inductor cache per run: a cache left by another version of this package can hold a
# compiled backward that calls a custom op since renamed (its key does not cover the op).
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="entropy-kernels-inductor-")
)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Interpreted kernels take milliseconds per program: no per-example deadline, few examples.
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
