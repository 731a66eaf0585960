"""torch backend: the training code's own network rebuilt from `architecture` + `model.safetensors`.

Useful where no ONNX runtime fits (or to check an export against the eager model). On a GPU it
can run in bf16/fp16 autocast and replay CUDA graphs, one captured per batch size. torch and
oecl_train are imported only when this backend is opened.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..artifact import Artifact, ArtifactError
from .base import Backend, BackendUnavailable

_AUTOCAST = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


class TorchBackend(Backend):
    """Eager `oecl_train.model.ScoreModel`; `precision` is the compute dtype (fp32, bf16, fp16)."""

    def __init__(
        self,
        artifact: Artifact,
        precision: str | None = None,
        device: str | None = None,
        cuda_graphs: bool = True,
        threads: int | None = None,
    ) -> None:
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable("torch is not installed") from e
        try:
            from safetensors.torch import load_file

            from oecl_train.model import ScoreModel, build_model
        except ImportError as e:
            raise BackendUnavailable(f"the torch backend needs oecl_train and safetensors ({e})") \
                from e
        self._torch = torch
        precision = precision or "fp32"
        if precision not in _AUTOCAST:
            raise ValueError(
                f"torch backend precision must be fp32, bf16 or fp16, not {precision!r}"
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("torch sees no CUDA device")
        if device == "cpu" and precision != "fp32":
            raise BackendUnavailable(f"torch backend runs {precision} only on a GPU")
        if device == "cpu" and threads:
            torch.set_num_threads(threads)  # torch has one intra-op pool per process

        arch = artifact.meta.get("architecture")
        if not isinstance(arch, dict):
            raise ArtifactError("oecl.json has no 'architecture': the torch backend cannot "
                                "rebuild the network")
        entry = artifact.require("safetensors")
        try:
            net = build_model(**arch)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"oecl.json architecture is not buildable: {e}") from e
        self._check_normalization(artifact, arch)
        state = load_file(str(artifact.path_of(entry)))
        state = _strip_prefix(state, net.state_dict().keys())
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise ArtifactError(f"{entry['path']} does not fit the architecture: {first}") from e

        self.model = _score_model(net, artifact, ScoreModel).eval().to(device)
        self.device = torch.device(device)
        self.name = f"torch-{self.device.type}"
        self.precision = precision
        self.max_batch = artifact.max_batch
        self._autocast = getattr(torch, _AUTOCAST[precision]) if _AUTOCAST[precision] else None
        self._use_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}

    @staticmethod
    def _check_normalization(artifact: Artifact, arch: dict[str, Any]) -> None:
        for key, want in (("mean", artifact.mean), ("std", artifact.std)):
            have = arch.get(key)
            if have is not None and not np.allclose(have, want, rtol=0, atol=1e-7):
                raise ArtifactError(
                    f"architecture.{key} {have} differs from input.normalization.{key} {want}"
                )

    def _forward(self, x: Any) -> Any:
        torch = self._torch
        if self._autocast is None:
            return self.model(x)[0]
        with torch.autocast(self.device.type, dtype=self._autocast):
            return self.model(x)[0].float()

    def _graph_for(self, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
        # Capturing costs a few warm-up passes, paid once per distinct batch size.
        torch = self._torch
        if shape[0] not in self._graphs:
            static_in = torch.zeros(shape, dtype=torch.uint8, device=self.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):
                    self._forward(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                static_out = self._forward(static_in)
            self._graphs[shape[0]] = (graph, static_in, static_out)
        return self._graphs[shape[0]]

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch))
        if self._use_graphs:
            graph, static_in, static_out = self._graph_for(tuple(batch.shape))
            static_in.copy_(x.pin_memory(), non_blocking=True)
            graph.replay()
            return static_out.cpu().numpy().astype(np.float32, copy=False)
        with torch.inference_mode():
            out = self._forward(x.to(self.device, non_blocking=True))
        return out.float().cpu().numpy()

    def close(self) -> None:
        self._graphs.clear()
        self.model = None  # type: ignore[assignment]


def _score_model(net: Any, artifact: Artifact, single: Any) -> Any:
    """The served score of the artifact: the plain-view `ScoreModel`, or the mean over the
    listed views from the same `oecl_train.views` code the exported graph was built with."""
    if artifact.score_name == "norm":
        return single(net)
    from oecl_train.views import ViewScoreModel, views_from_json

    spec = artifact.spec
    return ViewScoreModel(net, views_from_json(artifact.views), spec.height, spec.width)


def _strip_prefix(state: dict[str, Any], want: Any) -> dict[str, Any]:
    """Accept the net's own keys, or the same keys under one wrapper prefix.

    Training checkpoints store `model.<key>` and the scoring wrapper's state dict is `net.<key>`;
    both describe the same tensors.
    """
    want = set(want)
    if set(state) == want:
        return state
    for prefix in ("model.", "net."):
        if all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix):]: v for k, v in state.items()}
            if set(stripped) == want:
                return stripped
    return state
