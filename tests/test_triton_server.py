"""The `--backend python` repository in a real Triton Inference Server (the `nvidia-pytriton`
wheel's tritonserver, CPU only) and `oecl serve`, called by one tritonclient code (tests/
oip_client.py) over HTTP and gRPC: the same norms as oecl_runtime in process, for uint8 tensors
and for encoded PNG and JPEG images, and Triton batching concurrent requests."""

from __future__ import annotations

import io
import re
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import nchw_images, png_bytes, random_images
from live_servers import free_port, oecl_serve, triton_install, tritonserver
from oip_client import check_server, connect, encoded, infer
from PIL import Image

from oecl_runtime import Scorer
from oecl_runtime.triton_repo import write_repository

pytest.importorskip("tritonclient.http", reason="needs tritonclient[http,grpc] (the dev extra)")
pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[http,grpc] (the dev extra)")
_FOUND = triton_install()
pytestmark = pytest.mark.skipif(isinstance(_FOUND, str), reason=f"no runnable tritonserver: "
                                f"{_FOUND}")


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def servers(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, str]]:
    work = tmp_path_factory.mktemp("triton")
    # A long queue delay so that concurrent requests meet in one batch.
    write_repository(artifact_dir, work / "models", backend="python", kind="cpu",
                     max_delay_us=50_000)
    # The native form's ensemble, as written, with its ONNX step stood in by the Python scorer
    # (this tritonserver build has no onnxruntime backend): the decoding step and the ensemble
    # wiring run for real.
    write_repository(artifact_dir, work / "models", name="ens", kind="cpu")
    write_repository(artifact_dir, work / "models", name="ens_model", backend="python",
                     kind="cpu")
    grpc_port = free_port()
    with tritonserver(work / "models", work) as triton, \
            oecl_serve(artifact_dir, work / "serve.log", "--grpc-port", str(grpc_port)) as serve:
        yield {"triton-http": triton["http"], "triton-grpc": triton["grpc"],
               "triton-metrics": triton["metrics"], "serve-http": serve,
               "serve-grpc": f"127.0.0.1:{grpc_port}"}


@pytest.mark.parametrize("target", ["triton-http", "triton-grpc", "serve-http", "serve-grpc"])
def test_one_client_same_norms(servers: dict[str, str], scorer: Scorer, target: str) -> None:
    protocol = target.split("-")[1]
    url = servers[target]
    assert check_server(protocol, url, "oecl") == {
        "live": True, "ready": True, "model_ready": True, "inputs": ["image_bytes", "images"],
        "outputs": ["is_anomaly", "norm"]}
    client = connect(protocol, url)
    batch = nchw_images(6, seed=11)
    want = scorer.score_array(batch)
    out = infer(client, protocol, "oecl", "images", batch)
    assert out["norm"].shape == (6, 1) and out["norm"].dtype == np.float32
    np.testing.assert_allclose(out["norm"][:, 0], want, rtol=1e-6)
    np.testing.assert_array_equal(out["is_anomaly"][:, 0], want < scorer.threshold)

    imgs = random_images(4, seed=12, size=48)
    blobs = [png_bytes(imgs[0]), _jpeg(imgs[1]), png_bytes(imgs[2]), _jpeg(imgs[3])]
    want = np.array([r.norm for r in scorer.score(blobs)], np.float32)
    threshold = float(np.median(want))
    out = infer(client, protocol, "oecl", "image_bytes", encoded(blobs), threshold=threshold)
    np.testing.assert_allclose(out["norm"][:, 0], want, rtol=1e-6)
    np.testing.assert_array_equal(out["is_anomaly"][:, 0], want < threshold)


def test_bad_image_is_that_requests_error(servers: dict[str, str]) -> None:
    from tritonclient.utils import InferenceServerException

    for target in ("triton-http", "triton-grpc", "serve-http", "serve-grpc"):
        protocol = target.split("-")[1]
        client = connect(protocol, servers[target])
        blobs = [png_bytes(random_images(1)[0]), b"not an image"]
        with pytest.raises(InferenceServerException, match="image 1|image_bytes\\[1\\]"):
            infer(client, protocol, "oecl", "image_bytes", encoded(blobs))


def test_triton_batches_concurrent_requests(servers: dict[str, str]) -> None:
    def counts() -> tuple[float, float]:
        with urllib.request.urlopen(f"http://{servers['triton-metrics']}/metrics") as r:
            text = r.read().decode()
        found = [re.search(rf'^{name}{{model="oecl",version="1"}} (\S+)$', text, re.M)
                 for name in ("nv_inference_count", "nv_inference_exec_count")]
        assert all(found), text[:2000]
        return float(found[0].group(1)), float(found[1].group(1))

    before = counts()
    images = nchw_images(24, seed=13)

    def one(i: int) -> np.ndarray:
        client = connect("grpc", servers["triton-grpc"])
        return infer(client, "grpc", "oecl", "images", images[i:i + 1], outputs=("norm",))["norm"]

    with ThreadPoolExecutor(12) as pool:
        norms = list(pool.map(one, range(24)))
    assert all(n.shape == (1, 1) for n in norms)
    inferences, executions = (a - b for a, b in zip(counts(), before, strict=True))
    assert inferences == 24
    assert executions < 24, "no two requests ran as one batch"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_native_ensemble_decodes_with_oecl_runtime(servers: dict[str, str], scorer: Scorer,
                                                   protocol: str) -> None:
    client = connect(protocol, servers[f"triton-{protocol}"])
    batch = nchw_images(3, seed=21)
    out = infer(client, protocol, "ens", "images", batch, outputs=("norm",))
    np.testing.assert_allclose(out["norm"][:, 0], scorer.score_array(batch), rtol=1e-6)
    imgs = random_images(3, seed=22, size=40)
    blobs = [png_bytes(imgs[0]), _jpeg(imgs[1]), png_bytes(imgs[2])]
    out = infer(client, protocol, "ens", "image_bytes", encoded(blobs), outputs=("norm",))
    np.testing.assert_allclose(out["norm"][:, 0], [r.norm for r in scorer.score(blobs)],
                               rtol=1e-6)
