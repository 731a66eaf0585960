"""`oecl export` as it is asked for: the command, the refusals of bad input, TensorRT where it
can be built, the K-view graph of --views K, and what an export costs.

One tiny OECL run is trained per module (as in test_export.py); the K-view tests read one
export of it with K = VIEWS fixed views.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from export_support import float_input_convs, one_torch_thread, train_tiny_run  # noqa: E402

from oecl_runtime import Artifact, ArtifactError, Scorer  # noqa: E402
from oecl_runtime.backends.base import nvidia_gpu_present  # noqa: E402
from oecl_train import export  # noqa: E402
from oecl_train.data import Splits  # noqa: E402
from oecl_train.export import ExportError, VerificationFailed, export_run  # noqa: E402
from oecl_train.export.metadata import norm_stats  # noqa: E402
from oecl_train.export.norms import oe_images  # noqa: E402
from oecl_train.metrics import threshold_at_tpr  # noqa: E402

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
TRT_REASON = "tensorrt is not installed" if not HAVE_TRT else "no NVIDIA GPU is visible"
MAX_BATCH = 64


# Declared in each export test module: pytest shares fixtures between modules through conftest
# only.
@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _one_torch_thread):
    """(run_dir, splits) of a tiny OECL run trained for a few dozen steps."""
    return train_tiny_run(tmp_path_factory.mktemp("runs"))


# ---------------------------------------------------------------- refusals


def test_unknown_format_is_refused():
    with pytest.raises(ExportError, match="onnx-int4"):
        export.parse_formats("onnx,onnx-int4")
    assert export.parse_formats("onnx-int8") == ["onnx", "onnx-int8"]


def test_out_dir_that_is_not_an_artifact_is_refused(trained, tmp_path):
    run_dir, splits = trained
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an OECL artifact"):
        export_run(run_dir, out, "onnx", views=1, splits=splits, log=lambda m: None)
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(HAVE_TRT and nvidia_gpu_present(), reason="TensorRT can build here")
def test_tensorrt_without_tensorrt_fails_first(trained, tmp_path):
    from oecl_train.cli import main

    run_dir, _ = trained
    out = tmp_path / "model"
    missing = "tensorrt" if not HAVE_TRT else "GPU"
    with pytest.raises(ExportError, match=missing):
        export_run(run_dir, out, "onnx,tensorrt", log=lambda m: None)
    result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(out),
                                       "--format", "tensorrt"])
    assert result.exit_code != 0
    assert missing in result.output and "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing(trained, tmp_path, monkeypatch):
    run_dir, splits = trained
    monkeypatch.setattr(export.verify, "AUROC_TOL", -1.0)  # no AUROC can be within a negative bound
    out = tmp_path / "model"
    with pytest.raises(VerificationFailed, match=r"model\.onnx.*AUROC") as failed:
        export_run(run_dir, out, "onnx", max_batch=16, views=1, splits=splits, log=lambda m: None)
    assert failed.value.precisions == ("fp32",)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def _drift(monkeypatch, drifts, problem: str) -> None:
    """Verification sees the files for which drifts(row) holds fail with `problem`."""
    real = export.verify.check_against_torch

    def drifted(*args, **kwargs):
        report = real(*args, **kwargs)
        for r in report["files"]:
            if drifts(r):
                r["pass"], r["problems"] = False, [problem]
        report["pass"] = all(r["pass"] for r in report["files"])
        return report

    monkeypatch.setattr(export.verify, "check_against_torch", drifted)


def test_an_int8_file_that_drifts_alone_is_withheld_and_the_other_kept(trained, tmp_path,
                                                                        monkeypatch):
    """The symmetric (TensorRT) int8 file fails while onnxruntime's passes: the export keeps
    onnxruntime's, withholds the other, and says so in verify.json, oecl.json and the log;
    the artifact still verifies and an int8 engine names why it cannot be built."""
    from oecl_runtime import engine

    run_dir, splits = trained
    _drift(monkeypatch, lambda r: r["path"] == "model.int8.symmetric.onnx",
           "mean relative norm difference 0.03")
    out, lines = tmp_path / "model", []
    summary = export_run(run_dir, out, "onnx-int8", max_batch=16, views=1, splits=splits,
                         log=lines.append)
    assert not (out / "model.int8.symmetric.onnx").exists()
    assert "model.int8.symmetric.onnx" not in {f["path"] for f in summary["files"]}
    art = Artifact.open(out)  # hashes checked: oecl.json lists only what is there
    assert {f["path"] for f in art.meta["files"] if f["precision"] == "int8"} == {
        "model.int8.onnx"}
    why = {"model.int8.symmetric.onnx": "mean relative norm difference 0.03"}
    assert art.meta["verification"]["withheld"] == why
    report = json.loads((out / "verify.json").read_text())
    assert report["withheld"] == why and report["pass"] is True
    assert any("model.int8.symmetric.onnx withheld" in ln for ln in lines)
    assert Scorer.open(out, precision="int8", backend="onnxruntime").backend.precision == "int8"
    with pytest.raises(engine.EngineError, match="export withheld it"):
        engine.source_entry(art, "int8", strongly_typed=False)


def test_int8_files_that_all_drift_still_fail_the_export(trained, tmp_path, monkeypatch):
    run_dir, splits = trained
    _drift(monkeypatch, lambda r: r["precision"] == "int8", "AUROC drifted")
    with pytest.raises(VerificationFailed, match="AUROC drifted") as failed:
        export_run(run_dir, tmp_path / "model", "onnx-int8", max_batch=16, views=1,
                   splits=splits, log=lambda m: None)
    assert failed.value.precisions == ("int8",)
    assert list(tmp_path.iterdir()) == []


def test_accuracy_benchmark_serves_fp32_when_only_int8_fails_verification(
        trained, tmp_path, monkeypatch):
    """The exporter refuses an artifact with a drifting int8 file; the benchmark then serves
    the fp32 file alone and records the int8 refusal instead of stopping every later class."""
    from types import SimpleNamespace

    from helpers import import_benchmark

    bench = import_benchmark("bench_accuracy")
    # What bench_accuracy imports by bare name inside its functions.
    served, _ = import_benchmark("_served"), import_benchmark("_timing")
    run_dir, _ = trained
    _drift(monkeypatch, lambda r: r["precision"] == "int8", "AUROC drifted")
    args = SimpleNamespace(runs_dir=str(tmp_path), serve_views=[1], serve_threads=1)
    out = bench.serve_run(run_dir, "0", "oecl-photos", args)["1"]
    assert set(out) == {"fp32", "int8"}
    assert "model.int8.onnx" in out["int8"]["error"] and "AUROC drifted" in out["int8"]["error"]
    assert 0.0 <= out["fp32"]["metrics"]["AUROC"] <= 1.0
    art = Artifact.open(tmp_path / "artifacts" / "oecl-photos" / "class-0" / "views-1")
    assert {f["precision"] for f in art.meta["files"] if f["format"] == "onnx"} == {"fp32"}
    # The means say over how many classes they are, and which class served no int8.
    fine = {"1": {"fp32": out["fp32"], "int8": out["fp32"]}}
    mean = served.mean_served({"0": {"1": out}, "1": fine}, 1)
    assert mean["fp32"]["AUROC"] == pytest.approx(out["fp32"]["metrics"]["AUROC"])
    assert "classes" not in mean["fp32"]
    assert mean["int8"]["classes"] == 1 and mean["int8"]["failed_classes"] == ["0"]
    # A record of that class alone: no int8 mean, throughput of the fp32 file only.
    args.serve_methods, args.served_k = ["oecl-photos"], 1
    summary = bench.served_summary({"0": {"oecl-photos": {"served": {"1": out}}}},
                                   ["oecl-photos"], args)
    assert summary["per_class"]["0"]["int8"] == out["int8"]
    assert set(summary["mean"]) == {"fp32"} and set(summary["images_per_s"]["1"]) == {"fp32"}
    text = bench.served_markdown({"served": summary})
    assert "failed verification" in text and "| n/a |" in text


# ---------------------------------------------------------------- the command


def test_cli_help():
    from oecl_train.cli import main

    result = CliRunner().invoke(main, ["export", "--help"])
    assert result.exit_code == 0
    for opt in ("--out", "--format", "--max-batch", "--threshold-tpr", "--embedding",
                "--calib-images", "--no-verify", "--views"):
        assert opt in result.output


def test_cli_export(trained, tmp_path, monkeypatch):
    from oecl_train.cli import main

    run_dir, splits = trained
    # the data once per module
    monkeypatch.setattr(Splits, "from_config", classmethod(lambda cls, cfg, **kw: splits))
    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(out),
                                       "--max-batch", "16", "--threshold-tpr", "0.9"])
    assert result.exit_code == 0, result.output
    assert "model.onnx" in result.output and "higher = normal" in result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["verification"]["pass"] is True
    assert summary["threshold_rule"]["tpr"] == 0.9
    meta = Artifact.open(out).meta
    assert meta["max_batch"] == 16 and "embedding" not in meta["outputs"]
    from oecl_model.views import DEFAULT_VIEWS

    assert len(meta["score"]["views"]) == summary["views"] == DEFAULT_VIEWS  # the CLI default
    with Scorer.open(out, backend="onnxruntime-cpu") as scorer:
        results = scorer.score(list(splits.test_images[:3]))
    assert len(results) == 3


def test_self_oe_statistics_use_rotated_validation_images():
    class S:
        oe_mode, oe = "self", None
        id_val = np.arange(2 * 1 * 4 * 4, dtype=np.uint8).reshape(2, 1, 4, 4)

    oe = oe_images(S, seed=0)
    assert oe.shape == (4, 1, 4, 4)
    np.testing.assert_array_equal(oe[0], S.id_val[0, :, ::-1, ::-1])
    S.oe_mode = "none"
    assert oe_images(S, seed=0) is None


def test_threshold_and_stats_helpers() -> None:
    norms = np.arange(1, 101, dtype=np.float64)  # 1..100
    t = threshold_at_tpr(norms, 0.95)
    assert np.mean(norms >= t) >= 0.95
    assert np.mean(norms >= np.nextafter(t, np.inf)) < 0.95
    stats = norm_stats(norms)
    assert stats["n"] == 100 and stats["min"] == 1 and stats["max"] == 100
    assert stats["p50"] == pytest.approx(50.5)
    with pytest.raises(ArtifactError):
        threshold_at_tpr([], 0.95)


# ---------------------------------------------------------------- TensorRT (GPU boxes)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRT and nvidia_gpu_present()), reason=TRT_REASON)
def test_tensorrt_engines_build_and_verify(trained, tmp_path):
    run_dir, splits = trained
    out = tmp_path / "model"
    export_run(run_dir, out, "onnx,onnx-int8,tensorrt", max_batch=32, splits=splits,
               log=lambda m: None)
    art = Artifact.open(out)
    plans = {f["precision"]: f for f in art.meta["files"] if f["format"] == "tensorrt"}
    assert set(plans) == {"fp16", "int8"}
    for f in plans.values():
        assert f["tensorrt_version"] and f["gpu_name"] and f["compute_capability"]
    rows = {r["path"]: r for r in json.loads((out / "verify.json").read_text())["files"]}
    assert rows["model.plan"]["backend"] == "tensorrt"
    assert rows["model.plan"]["AUROC_diff"] <= 0.005
    with Scorer.open(out, backend="tensorrt", precision="fp16") as scorer:
        for n in (1, 7, 32):
            assert scorer.backend.run(np.ascontiguousarray(splits.test_images[:n])).shape == (n,)


# ---------------------------------------------------------------- the K-view graph

VIEWS = 4


@pytest.fixture(scope="module")
def artifact_views(trained, tmp_path_factory):
    """(artifact dir, summary) of the same run exported with K = VIEWS fixed views."""
    run_dir, splits = trained
    out = tmp_path_factory.mktemp("export-views") / "model"
    summary = export_run(
        run_dir, out, "onnx,onnx-fp16,onnx-int8", max_batch=MAX_BATCH, embedding=True,
        calib_images=64, device="cpu", views=VIEWS, splits=splits, log=lambda msg: None,
    )
    return out, summary


def _view_set(run_dir):
    from oecl_model.views import views_for
    from oecl_train.config import TrainConfig

    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    return views_for(cfg, 16, 16, VIEWS)


def test_view_graph_matches_torch_view_score(artifact_views, trained):
    from oecl_train.scores import view_scores
    from oecl_train.trainer import load_trained

    out, summary = artifact_views
    run_dir, splits = trained
    _, net, _ = load_trained(run_dir, "cpu")
    images = np.ascontiguousarray(splits.test_images[:50])
    want = view_scores(net, images, _view_set(run_dir), precision="fp32")
    single = export.torch_norms(net, images, torch.device("cpu"))
    assert np.abs(want - single).max() > 1e-3  # the views change the score
    with Scorer.open(out, backend="onnxruntime-cpu", precision="fp32") as scorer:
        got = scorer.score_array(images)
        np.testing.assert_allclose(got, want, rtol=1e-4)
        # N images in, N scores out, whatever the batch
        np.testing.assert_allclose(scorer.backend.run(images[:1]), got[:1], rtol=1e-5)
    with Scorer.open(out, backend="torch-cpu") as scorer:
        np.testing.assert_allclose(scorer.score_array(images), want, rtol=1e-4)
    with Scorer.open(out, backend="onnxruntime-cpu", precision="fp16") as scorer:
        np.testing.assert_allclose(scorer.score_array(images), want, rtol=2e-2)
    assert summary["score"] == "mean-view-norm (higher = normal)" and summary["views"] == VIEWS


def test_view_graph_embedding_is_the_mean_projection(artifact_views, trained):
    import onnxruntime as ort

    from oecl_model.views import ViewStack
    from oecl_train.trainer import load_trained

    out, _ = artifact_views
    run_dir, splits = trained
    _, net, _ = load_trained(run_dir, "cpu")
    images = splits.id_val[:20]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    norm, z = sess.run(["norm", "embedding"], {"images": images})
    assert z.shape == (len(images), 128)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), norm, rtol=1e-5)
    x = torch.from_numpy(images).float() / 255
    with torch.no_grad():
        want = torch.stack([net(ViewStack([v], 16, 16)(x)) for v in _view_set(run_dir)]).mean(0)
    np.testing.assert_allclose(z, want.numpy(), rtol=1e-3, atol=1e-5)


def test_view_metadata_lists_the_views_and_thresholds_the_view_score(artifact_views, trained):
    from oecl_model.views import views_to_json
    from oecl_train.trainer import load_trained

    out, _ = artifact_views
    run_dir, splits = trained
    art = Artifact.open(out)
    score = art.meta["score"]
    views = _view_set(run_dir)
    assert score["name"] == art.score_name == "mean-view-norm"
    assert score["views"] == art.views == views_to_json(views) and len(views) == VIEWS
    assert "bilinear" in score["resample"]
    _, net, _ = load_trained(run_dir, "cpu")
    ref = export.torch_norms(net, splits.id_val, torch.device("cpu"), views=views)
    assert score["threshold"] == pytest.approx(threshold_at_tpr(ref, 0.95), rel=1e-6)
    assert score["id_norm"]["mean"] == pytest.approx(float(ref.mean()), rel=1e-6)
    report = json.loads((out / "verify.json").read_text())
    assert report["pass"] is True and report["score"].startswith("mean-view-norm")
    rows = {r["path"]: r for r in report["files"]}
    assert rows["model.onnx"]["max_rel_diff"] <= 1e-4
    assert rows["model.safetensors"]["max_rel_diff"] <= 1e-4
    assert rows["model.int8.onnx"]["AUROC_diff"] <= 0.005


def test_view_maps_stay_float_in_int8(artifact_views):
    out, _ = artifact_views
    model = onnx.load(str(out / "model.int8.onnx"))
    maps = {i.name for i in model.graph.initializer if i.name.endswith(export.VIEW_MAP_NAMES)}
    assert len(maps) == 2
    users = [n for n in model.graph.node if maps & set(n.input)]
    assert [n.op_type for n in users] == ["MatMul", "MatMul"]  # not quantised away
    stem, *rest = float_input_convs(model)
    assert stem and not any(rest)  # the stem reads float, the rest of the network int8


def test_view_golden_set_holds_the_served_score(artifact_views):
    """An edge box's `oecl verify` compares against the score the graph serves, not the plain
    norm, so a K-view artifact verifies on its own golden set."""
    from oecl_runtime import golden

    out, _ = artifact_views
    art = Artifact.open(out)
    g = golden.load(art)
    with Scorer.open(out, backend="onnxruntime-cpu", precision="fp32") as scorer:
        np.testing.assert_allclose(scorer.score_array(g.images), g.reference, rtol=1e-4)
    report = golden.verify(out, backend="onnxruntime-cpu", precision="fp32")
    assert report["pass"] is True and report["score"].startswith("mean-view-norm")


# ---------------------------------------------------------------- cost and progress


def test_each_image_is_scored_by_pytorch_once(trained, tmp_path, monkeypatch):
    """Threshold, OE statistics, golden set and parity check share one scoring pass: the
    ID-validation images and the parity sample's ID images are one pool, scored once."""
    from oecl_runtime import golden
    from oecl_train.export import norms

    run_dir, splits = trained
    scored: list[int] = []
    real = norms.torch_norms

    def counting(net, images, *args, **kwargs):
        scored.append(len(images))
        return real(net, images, *args, **kwargs)

    monkeypatch.setattr(norms, "torch_norms", counting)
    out = tmp_path / "model"
    export_run(run_dir, out, "onnx", max_batch=16, views=2, splits=splits, log=lambda m: None)
    n_val, n_test_id = len(splits.id_val), int(splits.test_is_id.sum())
    held_id = n_val + n_test_id
    sample_id = min(held_id, norms.VERIFY_PER_SIDE)
    sample_ood = min(int((~splits.test_is_id).sum()), norms.VERIFY_PER_SIDE)
    n_oe = min(len(splits.oe), norms.OE_STATS_MAX)
    # At most the union of the validation images and the ID sample, never both in full.
    assert sum(scored) <= min(held_id, n_val + sample_id) + sample_ood + n_oe
    assert sum(scored) >= sample_id + sample_ood + n_oe
    # The golden set is part of the parity sample, with the same reference scores.
    g = golden.load(Artifact.open(out))
    report = json.loads((out / "verify.json").read_text())
    assert report["n_id"] == sample_id and report["n_ood"] == sample_ood
    assert len(g.images) <= report["n_images"]


def test_a_long_stage_says_it_is_still_running_and_counts_when_it_can():
    import time

    from oecl_train.export.progress import Progress

    lines: list[str] = []
    p = Progress(lines.append, every_s=0.05)
    with p.stage("export: model.onnx (fp32)", "export_fp32"):
        time.sleep(0.2)
    assert lines[0] == "export: model.onnx (fp32) ..."
    assert any(ln.startswith("export: model.onnx (fp32): still running, ") for ln in lines)
    assert lines[-1].startswith("export: model.onnx (fp32): ") and lines[-1].endswith(" s")
    lines.clear()
    with p.stage("reference: PyTorch scores", "reference"):
        tick = p.counter("reference", 30, "images")
        for _ in range(3):
            time.sleep(0.08)
            tick(10)
    # A counter speaks for its stage: counts, no heartbeat; the last count is the end line.
    assert [ln for ln in lines if "still running" in ln] == []
    assert "reference: 10/30 images" in lines and "reference: 20/30 images" in lines
    assert set(p.timings) == {"export_fp32", "reference"}
