"""distmed: cross-validated, Ray-distributed fine-tuning of ResNets on medical images."""

__version__ = "0.1.0"
