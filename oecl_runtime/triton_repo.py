"""A Triton Inference Server model repository made from an artifact (`oecl triton-repo`).

```
OUT/
  README.md                 the tritonserver command and a client call for this model
  <name>/config.pbtxt       uint8 NCHW `images` in, float32 `norm` out, dynamic batching
  <name>/1/model.onnx       or model.plan: the artifact's file, copied
```

The configuration carries the artifact's input, outputs and `max_batch`; Triton's own schema
(`inference.ModelConfig`) reads it, which the tests check with tritonclient's protobuf classes.
The score is the raw `norm` (higher = normal); the threshold is in `oecl.json` and stays with
the client, as it does for `oecl serve`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .artifact import Artifact, ArtifactError
from .atomic import atomic_dir, write_text

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"),
             "tensorrt": ("tensorrt_plan", "model.plan")}
_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}


def config_pbtxt(artifact: Artifact, name: str, fmt: str, max_batch: int,
                 max_delay_us: int, kind: str, instances: int,
                 compute_capability: str | None = None) -> str:
    """The text-format `ModelConfig` of one model (a plan names the compute capability it was
    built for)."""
    spec = artifact.spec
    lines = [
        f'name: "{name}"',
        f'platform: "{PLATFORMS[fmt][0]}"',
        f"max_batch_size: {max_batch}",
        "input [",
        "  {",
        f'    name: "{artifact.input_name}"',
        "    data_type: TYPE_UINT8",
        "    format: FORMAT_NCHW",
        f"    dims: [ {spec.channels}, {spec.height}, {spec.width} ]",
        "  }",
        "]",
        "output [",
    ]
    if compute_capability:
        # Triton's TensorRT backend takes the file listed for the GPU's compute capability and
        # falls back to default_model_filename; that name does not exist, so on another GPU
        # model the load fails naming the capability the plan needs.
        cc = compute_capability
        lines[2:2] = [f'cc_model_filenames [ {{ key: "{cc}" value: "{PLATFORMS[fmt][1]}" }} ]',
                      f'default_model_filename: "plan-built-for-compute-capability-{cc}-only"']
    outputs = artifact.meta["outputs"]
    for i, (out, desc) in enumerate(outputs.items()):
        dtype = _TYPES.get(desc.get("dtype", "float32"))
        if dtype is None:
            raise ArtifactError(f"output {out}: dtype {desc.get('dtype')!r} has no Triton type")
        # Triton's dims leave out the batch dimension; `norm` has no other, so it is declared
        # as [1] and reshaped to the model's [batch].
        per_image = [int(d) for d in desc.get("shape", ["batch"])[1:]]
        dims = ", ".join(map(str, per_image or [1]))
        lines += ["  {", f'    name: "{out}"', f"    data_type: {dtype}", f"    dims: [ {dims} ]"]
        if not per_image:
            lines.append("    reshape: { shape: [ ] }")
        lines.append("  }" + ("," if i < len(outputs) - 1 else ""))
    preferred = sorted({b for b in (1, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch}
                       | {max_batch})
    lines += [
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
        f"  max_queue_delay_microseconds: {max_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {instances}",
        f"    kind: KIND_{kind.upper()}",
        "  }",
        "]",
    ]
    return "\n".join(lines) + "\n"


def write_repository(
    artifact_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str = "oecl",
    fmt: str = "onnx",
    precision: str | None = None,
    max_delay_us: int = 5000,
    kind: str = "gpu",
    instances: int = 1,
) -> dict[str, Any]:
    """Write the repository to `out` (built aside, then swapped in); returns a summary."""
    if fmt not in PLATFORMS:
        raise ArtifactError(f"Triton format must be onnx or tensorrt, not {fmt!r}")
    if kind not in ("gpu", "cpu") or (fmt == "tensorrt" and kind == "cpu"):
        raise ArtifactError(f"instance kind {kind!r} cannot run a {fmt} model")
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ArtifactError(f"model name {name!r} must be letters, digits, '-', '_' or '.'")
    if instances < 1 or max_delay_us < 0:
        raise ArtifactError("instances must be >= 1 and the queue delay >= 0")
    art = Artifact.open(artifact_dir)
    entry = art.require(fmt, precision)
    # A plan's optimisation profile ends at its own max batch; Triton must not ask for more.
    max_batch = min(art.max_batch, int(entry.get("max_batch", art.max_batch)))
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _ours(out))):
        raise ArtifactError(f"--out {out} exists and is not a model repository made by oecl")
    config = config_pbtxt(art, name, fmt, max_batch, max_delay_us, kind, instances,
                          entry.get("compute_capability") if fmt == "tensorrt" else None)
    model_file = PLATFORMS[fmt][1]
    with atomic_dir(out) as tmp:
        version = tmp / name / "1"
        version.mkdir(parents=True)
        shutil.copyfile(art.path_of(entry), version / model_file)
        write_text(tmp / name / "config.pbtxt", config)
        write_text(tmp / "README.md", readme(art, name, fmt, entry, out))
    return {"repository": str(out), "model": name, "platform": PLATFORMS[fmt][0],
            "file": entry["path"], "precision": entry["precision"], "max_batch_size": max_batch,
            "config": str(out / name / "config.pbtxt")}


def _ours(out: Path) -> bool:
    """Whether `out` is a repository this module wrote (the swap-in replaces it)."""
    try:
        return (out / "README.md").read_text(encoding="utf-8").startswith(_TITLE)
    except (OSError, UnicodeDecodeError):
        return False


_TITLE = "# Triton model repository: "


def readme(art: Artifact, name: str, fmt: str, entry: dict[str, Any], out: Path) -> str:
    spec = art.spec
    shape = f"[N, {spec.channels}, {spec.height}, {spec.width}]"
    trt_note = ""
    if fmt == "tensorrt":
        trt_note = (
            f"\nThe plan was built with TensorRT {entry['tensorrt_version']} for "
            f"{entry['gpu_name']} (compute capability {entry['compute_capability']}). Triton "
            "loads it only if its container ships that same TensorRT version and runs on that "
            "GPU model: pick the matching `nvcr.io/nvidia/tritonserver` release, or rebuild the "
            "plan inside the container with `oecl engine`.\n")
    return _TITLE + f"""`{name}`

Made by `oecl triton-repo` from `{art.directory.name}/{entry['path']}` ({entry['precision']}).
Input `{art.input_name}`: uint8 {shape}, NCHW, pre-processed as `oecl.json` says (resize rule,
colour mode); normalisation is inside the graph. Output `norm`: float32 [N], higher = normal;
an image is anomalous when `norm < {art.threshold:.6g}` (the artifact's threshold).
{trt_note}
## Serve

```bash
docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
  -v {out.resolve()}:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
  tritonserver --model-repository=/models
```

## Call (Python, `pip install tritonclient[http]`)

```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("127.0.0.1:8000")
# your batch: N images of {spec.channels}x{spec.height}x{spec.width}, prepared as oecl.json says
images = np.zeros(({min(8, art.max_batch)}, {spec.channels}, {spec.height}, {spec.width}), np.uint8)
inp = httpclient.InferInput("{art.input_name}", list(images.shape), "UINT8")
inp.set_data_from_numpy(images)
result = client.infer("{name}", [inp], outputs=[httpclient.InferRequestedOutput("norm")])
norm = result.as_numpy("norm")
is_anomaly = norm < {art.threshold:.6g}
```
"""
