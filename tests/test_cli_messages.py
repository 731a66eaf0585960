"""What a newcomer reads: --help and --version, run directory vs artifact messages, plots."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest
from click.testing import CliRunner

from oecl_train.cli import main
from oecl_train.config import DATA_SOURCES
from oecl_train.data import READERS


def test_train_help_shows_true_defaults_and_every_source():
    r = CliRunner().invoke(main, ["train", "--help"], terminal_width=200)
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "[default: None]" not in text and "[default: ]" not in text
    assert "default: 2000 without --epochs" in text
    assert "ID source: " + ", ".join(READERS) + "." in text and READERS == DATA_SOURCES
    assert "by name (a folder name" in text and "only when no class name is itself a number" in text
    assert "[default: 10.0]" in text  # --checkpoint-minutes


def test_eval_help_imports_no_torch():
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom oecl_train.cli import main\n"
        "r = CliRunner().invoke(main, ['eval', '--help'])\n"
        "print(r.exit_code, 'torch' in sys.modules, 'Show a progress bar' in r.output)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False", "True"]


def test_version_names_torch_cuda_and_onnxruntime():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].startswith("oecl ")
    assert any(ln.startswith("torch ") and "CUDA" in ln for ln in lines)
    assert any(ln.startswith("onnxruntime ") for ln in lines)


def test_run_directory_and_artifact_are_told_apart(tmp_path):
    art = tmp_path / "model"
    art.mkdir()
    (art / "oecl.json").write_text(json.dumps({"schema_version": 1, "source": {"run": "bottle"}}))
    runner = CliRunner()
    for verb in (["eval", str(art)], ["export", str(art), "--out", str(tmp_path / "o")],
                 ["train", "--resume", str(art)]):
        r = runner.invoke(main, verb)
        assert r.exit_code != 0, verb
        assert "is a model artifact (exported from the run 'bottle')" in r.output, verb
        assert f"oecl score --model {art}" in r.output

    run = tmp_path / "runs" / "bottle"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    for verb in (["score", str(img), "--model", str(run)], ["bench", "--model", str(run)],
                 ["serve", "--model", str(run)]):
        r = runner.invoke(main, verb)
        assert r.exit_code != 0, verb
        assert "is a training run directory, not a model artifact" in r.output, verb
        assert f"oecl export {run} --out DIR" in r.output


def _capture_figures(monkeypatch, module) -> list:
    """Replace `module.with_file` so each figure is kept (drawn) before it is written."""
    seen = []
    real = module.with_file

    def keep(path, write):
        fig = plt.gcf()
        fig.canvas.draw()
        seen.append((path.name, fig))
        return real(path, write)

    monkeypatch.setattr(module, "with_file", keep)
    return seen


def test_norms_plot_legend_names_alpha_and_covers_no_line(tmp_path, monkeypatch):
    from oecl_train import plots

    rows = [
        {"epoch": e, "loss": 5 - e * 0.1, "contrastive": 4.0, "id_norm": 10 + e, "oe_norm": 8 - e,
         "alpha": 0.0 if e < 3 else 1.0}
        for e in range(1, 9)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = _capture_figures(monkeypatch, plots)
    plots.plot_training(tmp_path)
    fig = dict(seen)["norms.png"]
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["ID ‖z‖", "OE ‖z‖", "α (OE norm weight, right axis)"]
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), "the legend sits on the plot"


def test_bench_plot_axes_start_at_zero(tmp_path, monkeypatch):
    from oecl_runtime import bench

    rows = [{"mode": "backend", "batch_size": b, "images_per_s": 9500.0 + b,
             "latency_ms": {"p99": 1.0 + b / 100}} for b in (1, 8, 64)]
    seen = _capture_figures(monkeypatch, bench)
    bench._plot(rows, {"backend": "backend"}, tmp_path / "bench.png")
    fig = seen[0][1]
    assert all(ax.get_ylim()[0] == pytest.approx(0.0) for ax in fig.axes)


def test_export_help_says_safetensors_and_verify_json_are_written():
    r = CliRunner().invoke(main, ["export", "--help"], terminal_width=200)
    text = " ".join(r.output.split())
    assert "and so is model.safetensors" in text and "verify.json" in text


@pytest.mark.parametrize("n_classes, series", [(3, 3), (12, 1)])
def test_hist_has_one_series_per_ood_class_up_to_a_readable_number(
    tmp_path, monkeypatch, n_classes, series
):
    import numpy as np

    from oecl_train import report

    rng = np.random.default_rng(0)
    labels = ["good"] * 10 + [f"d{i % n_classes}" for i in range(5 * n_classes)]
    is_id = np.array([lb == "good" for lb in labels])
    scores = {"norm": rng.normal(size=len(labels))}
    seen = []
    monkeypatch.setattr(report, "_savefig", lambda fig, path: seen.append(fig))
    meta = {"threshold": None, "evaluation": {"served_score": "norm"},
            "scores": {"norm": {"metrics": {"AUROC": 0.5}}}}
    report.plot_hist(tmp_path / "h.png", meta, scores, is_id, labels)
    texts = [t.get_text() for t in seen[0].axes[0].get_legend().get_texts()]
    assert texts[0] == "ID (10)" and len(texts) == 1 + series
    if series == 1:
        assert texts[1] == f"OOD ({5 * n_classes})"
