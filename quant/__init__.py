"""Quantized linear layers: one file per weight format, one shared interface."""
