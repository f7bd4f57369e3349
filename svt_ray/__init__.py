"""svt-ray: Self-supervised Video Transformer (SVT) pretraining and scaling studies on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("svt-ray")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
