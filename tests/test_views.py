"""Deterministic test-time views: the view set, the resampling maps, the K-view score, and the
oecl.json checks of `score.views`. No training: a fixed random network."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oecl_model.model import build_model
from oecl_model.views import (
    View,
    ViewScoreModel,
    ViewStack,
    make_views,
    mean_over_views,
    view_matrices,
    views_from_json,
    views_to_json,
)
from oecl_runtime.artifact_schema import ArtifactError, _check_views
from oecl_train.scores import compute_scores, view_scores


def test_view_set_is_deterministic_nested_and_inside_the_family():
    views = make_views(16, 16, 16, (0.5, 1.0), hflip=True)
    assert views == make_views(16, 16, 16, (0.5, 1.0), hflip=True)
    assert views[0] == View(0, 0, 16, 16, False)  # the plain image first
    assert make_views(1, 16, 16) == (View(0, 0, 16, 16, False),)
    assert make_views(5, 16, 16, (0.5, 1.0), True) == views[:5]  # a K sweep compares nested sets
    assert len(set(views)) == len(views)
    for v in views[1:]:
        assert 0 <= v.top and v.top + v.height <= 16 and 0 <= v.left and v.left + v.width <= 16
        # whole-pixel boxes of the drawn area share, within rounding of the side
        assert 0.5 - 0.07 <= v.height * v.width / 256 <= 1.0
    assert [v.hflip for v in views[1:5]] == [True, False, True, False]
    assert not any(v.hflip for v in make_views(16, 16, 16, (0.5, 1.0), hflip=False))
    assert views_from_json(views_to_json(views)) == views
    with pytest.raises(ValueError, match="positive integer"):
        make_views(0, 16, 16)
    with pytest.raises(ValueError, match="crop scale"):
        make_views(4, 16, 16, (0.0, 1.0))


def test_aspect_ratio_views_stay_nested_inside_the_box_and_default_to_squares():
    from oecl_train.augment import CROP_RATIO

    square = make_views(16, 16, 16, (0.5, 1.0))
    assert make_views(16, 16, 16, (0.5, 1.0), ratio=(1.0, 1.0)) == square
    assert all(v.height == v.width for v in square)
    views = make_views(16, 16, 16, (0.5, 1.0), ratio=CROP_RATIO)
    assert views[0] == View(0, 0, 16, 16, False) and views[:6] == make_views(
        6, 16, 16, (0.5, 1.0), ratio=CROP_RATIO)
    aspects = [v.width / v.height for v in views[1:]]
    # whole-pixel sides of a drawn ratio in 3/4..4/3 (a side clipped to the image can push a
    # box further out, never past one pixel of rounding on each side)
    assert all(0.75 * 14 / 16 <= a <= 4 / 3 * 16 / 14 for a in aspects)
    assert min(aspects) < 0.9 and max(aspects) > 1.1  # both sides of square are drawn
    for v in views[1:]:
        assert 0 <= v.top and v.top + v.height <= 16 and 0 <= v.left and v.left + v.width <= 16
    with pytest.raises(ValueError, match="aspect ratio"):
        make_views(4, 16, 16, ratio=(1.2, 0.8))


def test_view_study_families(net):
    """The study's rows: fixed sets scored as the graph scores them, the random references
    drawn as `mean-aug-norm` draws them (K - 1 views beside the plain image)."""
    from helpers import import_benchmark

    from oecl_train.augment import CROP_RATIO
    from oecl_train.config import TrainConfig
    from oecl_train.evaluate import augment_for
    from oecl_train.metrics import ood_metrics

    served = import_benchmark("_served")
    parse_families, view_study = served.parse_families, served.view_study
    assert parse_families("train, aspect,0.75-1,random") == ["train", "aspect", (0.75, 1.0),
                                                              "random"]
    for bad in ("crops", "0.5", ","):
        with pytest.raises(ValueError, match="view family"):
            parse_families(bad)

    class Spec:
        channels, height, width = 1, 16, 16

    cfg = TrainConfig(crop_scale=(0.5, 1.0), hflip=False, jitter_p=0.8)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 1, 16, 16), dtype=np.uint8)
    is_id = np.arange(40) < 20
    fams = parse_families("train,aspect,random,random-crops,0.75-1")
    study = view_study(net, cfg, Spec, images, is_id, (1, 4), fams)
    assert list(study) == ["train", "aspect", "random", "random-crops", "0.75-1"]
    auroc = lambda s: ood_metrics(s, is_id)["AUROC"]  # noqa: E731
    plain = auroc(view_scores(net, images, make_views(1, 16, 16), precision="fp32"))
    assert all(row["1"] == pytest.approx(plain) for row in study.values())
    for label, views in (("train", make_views(4, 16, 16, (0.5, 1.0))),
                         ("aspect", make_views(4, 16, 16, (0.5, 1.0), ratio=CROP_RATIO)),
                         ("0.75-1", make_views(4, 16, 16, (0.75, 1.0)))):
        assert study[label]["4"] == pytest.approx(
            auroc(view_scores(net, images, views, precision="fp32")))
    random = compute_scores(net, images, scores=("mean-aug-norm",), k=3, precision="fp32",
                            augment=augment_for(cfg, Spec, "cpu"), batch=1024)
    assert study["random"]["4"] == pytest.approx(auroc(random["mean-aug-norm"]))
    assert study["random-crops"]["4"] != study["random"]["4"]  # no colour jitter there


def test_plain_view_is_the_identity():
    rows, cols = view_matrices([View(0, 0, 12, 16)], 12, 16)
    assert torch.equal(rows[0], torch.eye(12)) and torch.equal(cols[0], torch.eye(16))
    x = torch.rand(3, 2, 12, 16)
    assert torch.equal(ViewStack([View(0, 0, 12, 16)], 12, 16)(x), x)


@pytest.mark.parametrize("view", [View(2, 3, 9, 11), View(0, 5, 12, 8, True), View(4, 0, 7, 7)])
def test_view_is_crop_then_bilinear_resize(view):
    # Independent reference: PyTorch's half-pixel bilinear resize of the cropped box.
    x = torch.rand(2, 3, 12, 16, dtype=torch.float64).float()
    crop = x[:, :, view.top:view.top + view.height, view.left:view.left + view.width]
    want = F.interpolate(crop, size=(12, 16), mode="bilinear", align_corners=False)
    if view.hflip:
        want = want.flip(3)
    got = ViewStack([view], 12, 16)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_stack_is_view_major_and_mean_matches_a_loop():
    torch.manual_seed(0)
    views = make_views(4, 16, 16, (0.5, 1.0), hflip=True)
    x = torch.rand(5, 1, 16, 16)
    stacked = ViewStack(views, 16, 16)(x)
    assert stacked.shape == (20, 1, 16, 16)
    for k, v in enumerate(views):
        torch.testing.assert_close(stacked[5 * k:5 * k + 5], ViewStack([v], 16, 16)(x))
    z = torch.randn(20, 7)
    torch.testing.assert_close(mean_over_views(z, 4), z.view(4, 5, 7).mean(0))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model(depth="resnet10", width=8, in_channels=1, mean=[0.5], std=[0.5]).eval()


def test_view_score_by_hand_and_batch_independent(net):
    images = np.random.default_rng(0).integers(0, 256, (7, 1, 16, 16), dtype=np.uint8)
    views = make_views(4, 16, 16, (0.5, 1.0))
    x = torch.from_numpy(images).float() / 255
    with torch.no_grad():
        z = torch.stack([net(ViewStack([v], 16, 16)(x)) for v in views]).mean(0)
    want = torch.linalg.vector_norm(z, dim=1).numpy()
    for batch in (4, 8, 64):  # sub-batches of 1, 2 and 7 images
        got = view_scores(net, images, views, precision="fp32", batch=batch)
        np.testing.assert_allclose(got, want, rtol=2e-5)
    both = compute_scores(net, images, scores=("norm", "mean-view-norm"), views=views,
                          precision="fp32")
    np.testing.assert_allclose(both["mean-view-norm"], want, rtol=2e-5)
    # One view: the K-view score is the single-pass norm.
    one = view_scores(net, images, make_views(1, 16, 16), precision="fp32")
    np.testing.assert_allclose(one, both["norm"], rtol=1e-6)
    # The served module gives the same score, and its embedding is the mean projection.
    norm, mean_z = ViewScoreModel(copy.deepcopy(net), views, 16, 16)(torch.from_numpy(images))
    np.testing.assert_allclose(norm.detach().numpy(), want, rtol=2e-5)
    torch.testing.assert_close(mean_z.detach(), z, rtol=2e-5, atol=1e-6)


def test_view_score_needs_views(net):
    images = np.zeros((2, 1, 16, 16), np.uint8)
    with pytest.raises(ValueError, match="needs the list of views"):
        compute_scores(net, images, scores=("mean-view-norm",))


def _score(name, views):
    return {"name": name, "views": views}


def test_oecl_json_view_checks():
    inp = {"height": 16, "width": 16}
    plain = views_to_json(make_views(1, 16, 16))
    four = views_to_json(make_views(4, 16, 16, (0.5, 1.0), True))
    _check_views(_score("norm", plain), inp)
    _check_views(_score("mean-view-norm", four), inp)
    _check_views({"name": "norm"}, inp)  # artifacts from before views: the plain view alone
    bad = [
        (_score("norm", four), "must be 'mean-view-norm' for 4"),
        (_score("mean-view-norm", plain), "must be 'norm' for 1"),
        ({"name": "mean-view-norm"}, "needs score.views"),
        (_score("mean-view-norm", four[1:]), "must be the plain image"),
        (_score("mean-view-norm", [*four[:1], {**four[1], "top": 15}]), "outside the 16x16"),
        (_score("mean-view-norm", [*four[:1], {**four[1], "top": 1.5}]), "whole pixels"),
        (_score("mean-view-norm", [*four[:1], {"top": 0}]), "needs top, left"),
        (_score("norm", []), "at least one view"),
    ]
    for score, msg in bad:
        with pytest.raises(ArtifactError, match=msg):
            _check_views(score, inp)
