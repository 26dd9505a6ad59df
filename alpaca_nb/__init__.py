"""alpaca_nb: Stanford Alpaca reproduced end to end, the logic behind the alpaca-nb book."""

__version__ = "0.2.0"
