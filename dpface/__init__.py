"""dpface: distributed face-recognition training."""
__version__ = "0.1.0"
