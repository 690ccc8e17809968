"""distmed: cross-validated, Ray-distributed fine-tuning of torchvision ResNets on medical images."""

__version__ = "0.1.0"
