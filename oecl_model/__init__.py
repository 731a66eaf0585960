"""The OECL network and its deterministic test-time views: the layer that training, export and
the runtime's torch backend all build the same model from.

It depends on torch alone and on nothing of the project, so the serving side can rebuild a
network without importing training code. Importing this package does not import torch; its
modules do.
"""
