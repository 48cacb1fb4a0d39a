"""Test-wide setup: 8 fake CPU devices so sharding tests can build real meshes.

The flag must be set before JAX initialises its backend, hence here, before any test imports jax.
Unsharded computations run on device 0 as usual.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
