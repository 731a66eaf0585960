"""torch backend: the project's own network (`oecl_model`) rebuilt from `architecture` and
`model.safetensors`.

Useful where no ONNX runtime fits (or to check an export against the eager model). On a GPU it
runs fp32 as true fp32 (TF32 off), or bf16/fp16 autocast, and replays CUDA graphs captured at
open for a few bucket sizes (a batch is padded up to the next bucket) from one memory pool.
torch and oecl_model are imported only when this backend is opened.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..artifact import Artifact, ArtifactError
from .base import Backend, BackendUnavailable
from .outputs import norms_of, probe

_AUTOCAST = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


class TorchBackend(Backend):
    """Eager `oecl_model.model.ScoreModel`; `precision` is the compute dtype (fp32, bf16, fp16)."""

    def __init__(
        self,
        artifact: Artifact,
        precision: str | None = None,
        device: str | None = None,
        cuda_graphs: bool = True,
        threads: int | None = None,
        graph_batch_sizes: Sequence[int] | None = None,
    ) -> None:
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable("torch is not installed") from e
        try:
            from safetensors.torch import load_file

            from oecl_model.model import ScoreModel, build_model
        except ImportError as e:
            raise BackendUnavailable(f"the torch backend needs oecl_model and safetensors ({e})") \
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
        self._buckets: tuple[int, ...] = ()
        self._source = entry["path"]
        spec = artifact.spec
        chw = (spec.channels, spec.height, spec.width)
        if self._use_graphs:
            self._buckets = graph_buckets(self.max_batch, graph_batch_sizes)
            self._capture(chw)
        probe(self, chw)

    @staticmethod
    def _check_normalization(artifact: Artifact, arch: dict[str, Any]) -> None:
        for key, want in (("mean", artifact.mean), ("std", artifact.std)):
            have = arch.get(key)
            if have is not None and not np.allclose(have, want, rtol=0, atol=1e-7):
                raise ArtifactError(
                    f"architecture.{key} {have} differs from input.normalization.{key} {want}"
                )

    @contextmanager
    def _true_fp32(self) -> Iterator[None]:
        """fp32 means fp32: cuDNN's convolutions and cuBLAS's products default to TF32 on
        Ampere and newer, which moves norms by ~1e-3. Graphs keep the kernels chosen here."""
        torch = self._torch
        if self.device.type != "cuda" or self._autocast is not None:
            yield
            return
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def _forward(self, x: Any) -> Any:
        torch = self._torch
        if self._autocast is None:
            return self.model(x)[0]
        with torch.autocast(self.device.type, dtype=self._autocast):
            return self.model(x)[0].float()

    def _capture(self, chw: tuple[int, int, int]) -> None:
        """One graph per bucket, captured now rather than on the request path, all from one
        memory pool. Sharing is safe because graphs replay one at a time (the scorer holds a
        lock) and each output is copied out before the next replay: a later capture may reuse
        an earlier one's dead intermediates, never a tensor still read."""
        torch = self._torch
        pool = torch.cuda.graph_pool_handle()
        # Pinned staging, so the input copy is a plain DMA queued before the replay.
        self._host_in = torch.empty((self._buckets[-1], *chw), dtype=torch.uint8).pin_memory()
        with self._true_fp32(), torch.inference_mode():
            for size in sorted(self._buckets, reverse=True):  # the largest leaves the most to reuse
                static_in = torch.zeros((size, *chw), dtype=torch.uint8, device=self.device)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):  # cuDNN picks its algorithms before capture
                        self._forward(static_in)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    static_out = self._forward(static_in)
                self._graphs[size] = (graph, static_in, static_out)
        torch.cuda.synchronize(self.device)

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        n = batch.shape[0]
        x = torch.from_numpy(np.ascontiguousarray(batch))
        if self._use_graphs:
            size = self._buckets[bisect.bisect_left(self._buckets, n)]
            graph, static_in, static_out = self._graphs[size]
            self._host_in[:n].copy_(x)
            # Rows n..size keep an earlier batch: every image's norm is computed on its own,
            # so the padding changes nothing and is not worth clearing.
            static_in[:n].copy_(self._host_in[:n], non_blocking=True)
            graph.replay()
            return norms_of(static_out[:n].cpu().numpy(), n, self._source)
        with self._true_fp32(), torch.inference_mode():
            out = self._forward(x.to(self.device, non_blocking=True))
        return norms_of(out.float().cpu().numpy(), n, self._source)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "cuda_graph_batch_sizes": list(self._buckets)}

    def close(self) -> None:
        self._graphs.clear()
        self.model = None  # type: ignore[assignment]


def graph_buckets(max_batch: int, sizes: Sequence[int] | None = None) -> tuple[int, ...]:
    """Batch sizes to capture: by default 1, 2, 4, ... below `max_batch`, and `max_batch`, so a
    batch pads by less than 2x and at most log2(max_batch) + 1 graphs exist. Given `sizes` are
    kept within 1..max_batch, and max_batch is always one (every batch must fit one)."""
    if sizes is None:
        sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    bad = [s for s in sizes if not 1 <= int(s) <= max_batch]
    if bad:
        raise ValueError(f"CUDA graph batch sizes must be in 1..{max_batch}, got {bad}")
    return tuple(sorted({int(s) for s in sizes} | {max_batch}))


def _score_model(net: Any, artifact: Artifact, single: Any) -> Any:
    """The served score of the artifact: the plain-view `ScoreModel`, or the mean over the
    listed views from the same `oecl_model.views` code the exported graph was built with."""
    if artifact.score_name == "norm":
        return single(net)
    from oecl_model.views import ViewScoreModel, views_from_json

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
