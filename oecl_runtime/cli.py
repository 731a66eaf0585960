"""The runtime's command group: `python -m oecl_runtime` (a box that has the runtime alone).

It lists the verbs of `verbs.RUNTIME_VERBS`, as `oecl` does; each verb's command is in
`commands` and is imported only when that verb runs.
"""

from __future__ import annotations

import click

from .verbs import RUNTIME_VERBS, VerbGroup


class _RuntimeGroup(VerbGroup):
    verbs = RUNTIME_VERBS


@click.group("oecl-runtime", cls=_RuntimeGroup)
def main() -> None:
    """Score, serve and benchmark OECL model artifacts (no torch needed)."""
