"""The runtime's verbs, one table that `oecl` and `python -m oecl_runtime` both list.

Imports click alone: listing the verbs (`--help`) must not load numpy, onnxruntime or torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import ClassVar

import click

# verb -> (module, attribute of its click command, short help)
Verb = tuple[str, str, str]

RUNTIME_VERBS: dict[str, Verb] = {
    "score": ("oecl_runtime.commands.score", "score",
              "Score images with an exported model (no torch)."),
    "serve": ("oecl_runtime.commands.serve", "serve", "Serve an exported model over HTTP."),
    "bench": ("oecl_runtime.commands.bench", "bench", "Measure scoring latency and throughput."),
    "verify": ("oecl_runtime.commands.verify", "verify",
               "Check a backend here on the artifact's golden set."),
    "engine": ("oecl_runtime.commands.engine", "engine",
               "Build and record TensorRT engines on this GPU."),
    "triton-repo": ("oecl_runtime.commands.triton_repo", "triton_repo",
                    "Write a Triton Inference Server model repository."),
}


class VerbGroup(click.Group):
    """A group over a verb table (`verbs`, set by a subclass): each verb's module is imported
    only when that verb runs."""

    verbs: ClassVar[Mapping[str, Verb]] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.verbs)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.verbs:
            return None
        module, attr, _ = self.verbs[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise click.ClickException(f"'oecl {name}' is unavailable: {e}") from e

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table, so listing the verbs imports nothing heavy.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in self.verbs.items()])
