"""Torch-free serving of OECL models: pre-processing, backends, scoring, HTTP server, benchmark."""

__version__ = "0.1.0"
