"""joynode: the node software of JoyNet (verified, paid AI inference)."""

__version__ = "0.1.0"
