"""hist.png: one wide panel per score that matters, ID against each OOD class, on a scale where
both show, the threshold on top, a legend, distinct colours."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from oecl_train import report as report_module  # noqa: E402


def _report(served: str = "mean-view-norm") -> dict:
    metrics = {"metrics": {"AUROC": 0.9}}
    return {
        "evaluation": {"served_score": served},
        "threshold": {"score": served, "value": 1.5, "tpr_target": 0.95},
        "scores": {n: metrics for n in ("norm", "mean-aug-norm", "mean-sq-norm", served)},
    }


def _scores() -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    is_id = np.r_[np.ones(200, bool), np.zeros(300, bool)]
    # OE-trained norms: ID around 3, one defect type near 0 (a spike), another near ID.
    s = np.r_[rng.normal(3.0, 0.4, 200), rng.uniform(0.001, 0.01, 150), rng.normal(2.0, 0.5, 150)]
    s = np.abs(s)
    labels = ["good"] * 200 + ["crack"] * 150 + ["scratch"] * 150
    scores = {"norm": s, "mean-aug-norm": s, "mean-sq-norm": s ** 2, "mean-view-norm": s * 0.9}
    return scores, is_id, labels


def test_hist_shows_the_served_score_and_norm_on_a_scale_where_both_show(tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(report_module, "_savefig",
                        lambda fig, path: (figs.append(fig), report_module._pyplot().close(fig)))
    scores, is_id, labels = _scores()
    report_module.plot_hist(tmp_path / "hist.png", _report(), scores, is_id, labels)
    (fig,) = figs
    axes = fig.axes
    assert len(axes) == 2  # the served score, then norm; not the research scores
    assert axes[0].get_title().startswith("mean-view-norm (served): AUROC 0.9000")
    assert axes[1].get_title().startswith("norm: AUROC")
    # The spike near 0 and the ID near 3 are 300x apart: a log axis shows both.
    assert all(ax.get_xscale() == "log" for ax in axes)
    texts = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert texts[:3] == ["ID (200)", "OOD crack (150)", "OOD scratch (150)"]
    assert texts[3].startswith("threshold 1.5 ")
    # The threshold is drawn above every histogram, only on the score it was taken on.
    line = next(ln for ln in axes[0].get_lines() if ln.get_label().startswith("threshold"))
    assert line.get_zorder() > max(p.get_zorder() for p in axes[0].patches)
    assert not any(ln.get_label().startswith("threshold") for ln in axes[1].get_lines())
    # Each OOD class in its own colour, none the ID's.
    handles = axes[0].get_legend().legend_handles
    edge = [tuple(np.round(h.get_edgecolor(), 3)) for h in handles[1:3]]
    face = tuple(np.round(handles[0].get_facecolor()[:3], 3))
    assert len(set(edge)) == 2 and all(e[:3] != face for e in edge)
    assert fig.get_size_inches()[0] >= 10  # wide enough to read


def test_bins_cover_the_bulk_and_go_linear_when_the_range_is_narrow():
    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(5, 1, 1000), [1e6]]  # one extreme value
    bins, log = report_module.hist_bins(x)
    assert not log and bins[-1] < 20  # the outlier does not squeeze the rest into one bin
    bins, log = report_module.hist_bins(np.r_[np.full(100, 0.002), np.full(100, 3.0)])
    assert log and bins[0] == pytest.approx(0.002) and bins[-1] == pytest.approx(3.0)


def test_hist_writes_a_png(tmp_path):
    scores, is_id, labels = _scores()
    report_module.plot_hist(tmp_path / "hist.png", _report(), scores, is_id, labels)
    assert (tmp_path / "hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
