"""wartok: discrete image tokenizers trained with a Wasserstein-gradient-flow prior-matching signal."""

__version__ = "0.1.0"
