"""How many fixed views K the served score (mean-view-norm) uses when none is asked for. Decided
here alone, for `oecl eval`, `oecl export` and `oecl train`'s test AUROC alike, so the three
report and serve the same score."""

from __future__ import annotations

from oecl_model.views import DEFAULT_VIEWS


def view_count(views: int | None = None) -> int:
    """`views`, or DEFAULT_VIEWS when it is not given."""
    return DEFAULT_VIEWS if views is None else views
