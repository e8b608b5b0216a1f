"""Settings for the whole test suite."""
import os

# The fused CPU kernels (densenet.models.fused) compile once per process, about 20 s; the suite starts
# hundreds of models and dozens of `densenet` processes, so it runs the eager forms, which are the
# reference. tests/test_fused.py turns the compiled forms on and checks them against the eager ones
# and the layer-by-layer model; `DENSENET_FUSED=1 python -m pytest` runs everything with them.
os.environ.setdefault("DENSENET_FUSED", "0")

# `densenet train` on the CPU tells glibc's malloc to keep freed memory (densenet.training.allocator),
# a setting of the whole process; the suite trains in its own process, so it keeps malloc's defaults.
# tests/test_allocator.py checks the setting in fresh processes.
os.environ.setdefault("DENSENET_KEEP_FREED_MEMORY", "0")
