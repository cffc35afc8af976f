"""recaption: recaption image datasets with LLaVA and distil KOALA text-to-image models."""

__version__ = "0.1.0"
