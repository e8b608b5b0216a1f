"""Settings for the whole test suite."""
import os

# The fused CPU kernels (densenet.models.fused) compile once per process, about 20 s; the suite starts
# hundreds of models and dozens of `densenet` processes, so it runs the eager forms, which are the
# reference. tests/test_fused.py turns the compiled forms on and checks them against the eager ones
# and the layer-by-layer model; `DENSENET_FUSED=1 python -m pytest` runs everything with them.
os.environ.setdefault("DENSENET_FUSED", "0")
