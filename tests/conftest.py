"""Test set-up. JAX must see its device count before its backend starts, so this runs first."""

import os

# Two fake CPU devices: every training test then exercises the sharded batch path.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
