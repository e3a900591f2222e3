"""ds2d2: small, fast remote-sensing detectors by DS2D2 knowledge distillation."""

__version__ = "0.1.0"
