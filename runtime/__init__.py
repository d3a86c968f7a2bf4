"""s2edge runtime: load Fish Audio S2 Pro, build prompts, generate codes, decode audio."""

__version__ = "0.1.0"
