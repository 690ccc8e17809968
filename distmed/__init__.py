"""distmed: cross-validated, Ray-distributed fine-tuning of ResNets on medical images."""

from importlib import metadata as _metadata

__version__ = "0.1.0"


def version() -> str:
    """The installed distribution's version (`distmed --version`, the registered MLflow
    model's requirement); `__version__` when run from a source tree that is not installed."""
    try:
        return _metadata.version("distmed")
    except _metadata.PackageNotFoundError:
        return __version__
