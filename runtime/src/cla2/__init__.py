"""cla2: the Chinese-LLaMA-2 / Chinese-Alpaca-2 runtime of the kit."""

__version__ = "0.1.0"
