"""mura_ray: train, tune and score musculoskeletal radiograph classifiers (MURA) at scale on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mura_ray")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
