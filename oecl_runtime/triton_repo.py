"""A Triton Inference Server model repository made from an artifact (`oecl triton-repo`).

```
OUT/                        a model repository; other models in it are left alone
  <name>/README.md          the tritonserver command and a client call for this model
  <name>/config.pbtxt       uint8 NCHW `images` in, float32 `norm` out, dynamic batching
  <name>/1/model.onnx       or model.plan: the artifact's file, copied
```

With `backend="python"` the model is Triton's Python backend running `oecl_runtime`'s scorer
(`serving.triton_model`): `<name>/1/model.py` and `<name>/1/artifact/` (the artifact, copied);
it takes `images` or `image_bytes` (encoded images, resized per `oecl.json` by oecl_runtime) and
answers `norm` and `is_anomaly`, as `oecl serve`'s /v2 routes do.

The configuration carries the artifact's input, outputs and `max_batch`; Triton's own schema
(`inference.ModelConfig`) reads it, which the tests check with tritonclient's protobuf classes,
and the tests run the Python form in a real tritonserver. The score is the raw `norm` (higher =
normal); the threshold is in `oecl.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .artifact import Artifact, ArtifactError
from .atomic import atomic_dir, write_text
from .names import BYTES_INPUT, TRITON_MODEL_NAME, valid_model_name
from .serving.config import BatchPolicy

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"),
             "tensorrt": ("tensorrt_plan", "model.plan")}
BACKENDS = ("native", "python")  # Triton's backend for the file, or oecl_runtime in Python
PIXELS = "pixels"  # the preprocessing step's output: the model-ready uint8 batch
MODEL_STEP, PREPROCESS_STEP = "_model", "_preprocess"  # the ensemble's steps: name + suffix
ARTIFACT_DIR = "artifact"  # the Python-backend model's copy of the artifact, in its version dir
_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}


def config_pbtxt(artifact: Artifact, name: str, fmt: str, max_batch: int,
                 max_delay_us: int, kind: str, instances: int,
                 compute_capability: str | None = None) -> str:
    """The text-format `ModelConfig` of one model (a plan names the compute capability it was
    built for)."""
    spec = artifact.spec
    lines = [
        f"name: {pbtxt_string(name)}",
        f'platform: "{PLATFORMS[fmt][0]}"',
        f"max_batch_size: {max_batch}",
        "input [",
        "  {",
        f"    name: {pbtxt_string(artifact.input_name)}",
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
        lines += ["  {", f"    name: {pbtxt_string(out)}", f"    data_type: {dtype}",
                  f"    dims: [ {dims} ]"]
        if not per_image:
            lines.append("    reshape: { shape: [ ] }")
        lines.append("  }" + ("," if i < len(outputs) - 1 else ""))
    lines.append("]")
    return "\n".join(lines + _batching(max_batch, max_delay_us, kind, instances)) + "\n"


def _batching(max_batch: int, max_delay_us: int, kind: str, instances: int) -> list[str]:
    preferred = sorted({b for b in (1, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch}
                       | {max_batch})
    return [
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


def pbtxt_string(text: str) -> str:
    """`text` as a quoted protobuf text-format string: quotes, backslashes, control and
    non-ASCII bytes escaped, so a tensor name cannot end the string and inject fields."""
    out = []
    for byte in text.encode("utf-8"):
        c = chr(byte)
        if c in "\\\"":
            out.append("\\" + c)
        elif 32 <= byte < 127:
            out.append(c)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def python_config_pbtxt(artifact: Artifact, name: str, scorer_backend: str,
                        precision: str | None, max_batch: int, max_delay_us: int, kind: str,
                        instances: int) -> str:
    """The `ModelConfig` of the Python-backend scorer (`serving.triton_model`): either input;
    one value per image out, [N, 1] to clients as every batching Triton model answers."""
    lines = [f"name: {pbtxt_string(name)}", 'backend: "python"', f"max_batch_size: {max_batch}",
             *_either_input(artifact), "output [",
             *_io_tensor("norm", "TYPE_FP32", "1", False),
             *_io_tensor("is_anomaly", "TYPE_BOOL", "1", True), "]",
             *_batching(max_batch, max_delay_us, kind, instances)]
    params = {"oecl_backend": scorer_backend, "oecl_precision": precision or ""}
    for key, value in params.items():
        lines += ["parameters {", f"  key: {pbtxt_string(key)}",
                  f"  value: {{ string_value: {pbtxt_string(value)} }}", "}"]
    return "\n".join(lines) + "\n"


def _io_tensor(tname: str, dtype: str, dims: str, last: bool, extra: tuple[str, ...] = (),
               reshape: bool = True) -> list[str]:
    # dims "1": one value per image; a model reshapes it to see the batch dimension alone.
    return ["  {", f"    name: {pbtxt_string(tname)}", f"    data_type: {dtype}", *extra,
            f"    dims: [ {dims} ]",
            *(["    reshape: { shape: [ ] }"] if dims == "1" and reshape else []),
            "  }" + ("" if last else ",")]


def _either_input(artifact: Artifact, reshape: bool = True) -> list[str]:
    """The `input [...]` block of a model that takes the artifact's uint8 input or encoded
    images, either one per request."""
    spec = artifact.spec
    return ["input [",
            *_io_tensor(artifact.input_name, "TYPE_UINT8",
                        f"{spec.channels}, {spec.height}, {spec.width}", False,
                        ("    format: FORMAT_NCHW", "    optional: true")),
            *_io_tensor(BYTES_INPUT, "TYPE_STRING", "1", True, ("    optional: true",),
                        reshape),
            "]"]


def preprocess_config_pbtxt(artifact: Artifact, name: str, max_batch: int, kind: str,
                            instances: int) -> str:
    """The ensemble's first step: either input in, the model-ready uint8 batch out."""
    spec = artifact.spec
    lines = [f"name: {pbtxt_string(name + PREPROCESS_STEP)}", 'backend: "python"',
             f"max_batch_size: {max_batch}", *_either_input(artifact), "output [",
             *_io_tensor(PIXELS, "TYPE_UINT8", f"{spec.channels}, {spec.height}, {spec.width}",
                         True), "]",
             "instance_group [", "  {", f"    count: {instances}", "    kind: KIND_CPU", "  }",
             "]"]
    del kind  # decoding runs on the CPU whatever the model's instances are
    return "\n".join(lines) + "\n"


def ensemble_config_pbtxt(artifact: Artifact, name: str, max_batch: int) -> str:
    """The entry model: preprocessing step, then the ONNX or TensorRT model (dynamic batching
    happens there); `norm` out."""
    def step(model: str, inputs: dict[str, str], outputs: dict[str, str], last: bool
             ) -> list[str]:
        maps = [f"      input_map {{ key: {pbtxt_string(k)} value: {pbtxt_string(v)} }}"
                for k, v in inputs.items()]
        maps += [f"      output_map {{ key: {pbtxt_string(k)} value: {pbtxt_string(v)} }}"
                 for k, v in outputs.items()]
        return ["    {", f"      model_name: {pbtxt_string(model)}", "      model_version: -1",
                *maps, "    }" + ("" if last else ",")]

    inp = artifact.input_name
    lines = [f"name: {pbtxt_string(name)}", 'platform: "ensemble"', f"max_batch_size: {max_batch}",
             *_either_input(artifact, reshape=False), "output [",
             *_io_tensor("norm", "TYPE_FP32", "1", True, reshape=False), "]",
             "ensemble_scheduling {", "  step ["]
    lines += step(name + PREPROCESS_STEP, {inp: inp, BYTES_INPUT: BYTES_INPUT}, {PIXELS: "_pixels"},
                  False)
    lines += step(name + MODEL_STEP, {inp: "_pixels"}, {"norm": "norm"}, True)
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def write_repository(
    artifact_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str = TRITON_MODEL_NAME,
    fmt: str = "onnx",
    precision: str | None = None,
    max_delay_us: int = BatchPolicy().max_delay_us,  # as long as `oecl serve` waits
    kind: str = "gpu",
    instances: int = 1,
    backend: str = "native",
    image_bytes: bool = True,
) -> dict[str, Any]:
    """Write model `name` into the repository `out` (each model's directory built aside, then
    swapped in; other models in `out` are not touched); returns a summary.

    The native backend with `image_bytes` writes an ensemble `name` (either input) of
    `name_preprocess` (Python: oecl_runtime decodes, resizes, passes uint8 through) and
    `name_model` (the ONNX or TensorRT file); without it, the file's model alone as `name`."""
    if fmt not in PLATFORMS:
        raise ArtifactError(f"Triton format must be onnx or tensorrt, not {fmt!r}")
    if backend not in BACKENDS:
        raise ArtifactError(f"Triton backend must be native or python, not {backend!r}")
    if kind not in ("gpu", "cpu") or (fmt == "tensorrt" and kind == "cpu"):
        raise ArtifactError(f"instance kind {kind!r} cannot run a {fmt} model")
    if not valid_model_name(name):
        raise ArtifactError(f"model name {name!r} must be letters, digits, '-', '_' or '.'")
    if instances < 1 or max_delay_us < 0:
        raise ArtifactError("instances must be >= 1 and the queue delay >= 0")
    art = Artifact.open(artifact_dir)
    entry = art.require(fmt, precision)
    # A plan's optimisation profile ends at its own max batch; Triton must not ask for more.
    max_batch = min(art.max_batch, int(entry.get("max_batch", art.max_batch)))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out} is a file; give a model repository directory")
    # (directory name, config.pbtxt, what goes into version 1, README) per model written.
    models: list[tuple[str, str, Callable[[Path], None], str]] = []
    if backend == "python":
        scorer_backend = ("tensorrt" if fmt == "tensorrt" else
                          "onnxruntime-cpu" if kind == "cpu" else "onnxruntime")
        config = python_config_pbtxt(art, name, scorer_backend, entry["precision"], max_batch,
                                     max_delay_us, kind, instances)
        platform = "python"

        def fill(version: Path) -> None:
            shutil.copytree(art.directory, version / ARTIFACT_DIR)
            write_text(version / "model.py", _MODEL_PY.format(cls="TritonPythonModel"))
    else:
        model_name = f"{name}{MODEL_STEP}" if image_bytes else name
        config = config_pbtxt(art, model_name, fmt, max_batch, max_delay_us, kind, instances,
                              entry.get("compute_capability") if fmt == "tensorrt" else None)
        platform = PLATFORMS[fmt][0]

        def fill(version: Path) -> None:
            shutil.copyfile(art.path_of(entry), version / PLATFORMS[fmt][1])
    text = readme(art, name, fmt, entry, out, kind, backend, image_bytes)
    if backend == "native" and image_bytes:
        step = f"{_TITLE}`{{}}`\n\nA step of the ensemble `{name}`; see {name}/README.md.\n"

        def fill_pre(version: Path) -> None:
            write_text(version / "oecl.json", json.dumps(art.meta))
            write_text(version / "model.py", _MODEL_PY.format(cls="TritonPreprocessModel"))

        models += [(model_name, config, fill, step.format(model_name)),
                   (name + PREPROCESS_STEP, preprocess_config_pbtxt(art, name, max_batch, kind,
                                                                    instances),
                    fill_pre, step.format(name + PREPROCESS_STEP)),
                   (name, ensemble_config_pbtxt(art, name, max_batch), lambda v: None, text)]
        platform = f"ensemble ({platform})"
    else:
        models.append((name, config, fill, text))
    for model, *_ in models:
        if (out / model).exists() and not _ours(out / model):
            raise ArtifactError(f"{out / model} exists and is not a model made by oecl; pick "
                                "another --name or --out")
    for model, config, fill_version, text in models:
        with atomic_dir(out / model) as tmp:
            (tmp / "1").mkdir()
            fill_version(tmp / "1")
            write_text(tmp / "config.pbtxt", config)
            write_text(tmp / "README.md", text)
    _drop_old_readme(out, name)
    return {"repository": str(out), "model": name, "platform": platform,
            "file": entry["path"], "precision": entry["precision"], "max_batch_size": max_batch,
            "config": str(out / name / "config.pbtxt"), "models": [m[0] for m in models]}


_TITLE = "# Triton model repository: "
_MODEL_PY = '''"""Triton Python-backend model written by `oecl triton-repo`: the installed
oecl_runtime does the work (see oecl_runtime/serving/triton_model.py)."""

from oecl_runtime.serving.triton_model import {cls} as TritonPythonModel  # noqa: F401
'''


def _ours(model_dir: Path) -> bool:
    """Whether `model_dir` is a model this module wrote (the swap-in replaces it). Earlier
    versions wrote the README beside the model, at the top of the repository."""
    for readme_path, head in ((model_dir / "README.md", _TITLE),
                              (model_dir.parent / "README.md", f"{_TITLE}`{model_dir.name}`")):
        try:
            if readme_path.read_text(encoding="utf-8").startswith(head):
                return True
        except (OSError, UnicodeDecodeError):
            pass
    return False


def _drop_old_readme(out: Path, name: str) -> None:
    old = out / "README.md"
    try:
        if old.read_text(encoding="utf-8").startswith(f"{_TITLE}`{name}`"):
            old.unlink()
    except (OSError, UnicodeDecodeError):
        pass


def readme(art: Artifact, name: str, fmt: str, entry: dict[str, Any], out: Path,
           kind: str = "gpu", backend: str = "native", image_bytes: bool = True) -> str:
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
    gpus = "--gpus all " if kind == "gpu" else ""
    inputs = (f"Inputs, either: `{art.input_name}` uint8 {shape}, NCHW, pre-processed as "
              f"`oecl.json` says (resize rule, colour mode), or `{BYTES_INPUT}` BYTES [N, 1], "
              "encoded images (PNG, JPEG, ...) that oecl_runtime decodes and resizes as "
              "`oecl.json` says.")
    if backend == "python":
        what = (f"Triton's Python backend runs oecl_runtime's scorer on `1/{ARTIFACT_DIR}/` "
                f"({entry['path']}, {entry['precision']}). {inputs} Outputs: `norm` float32 "
                "[N, 1] and `is_anomaly` bool [N, 1] (`norm` below the request parameter "
                "`threshold`, else the artifact's).")
    elif image_bytes:
        what = (f"`{name}` is an ensemble: `{name}{PREPROCESS_STEP}` (Triton's Python backend, "
                "oecl_runtime's decoding and resizing; uint8 tensors pass through) feeds "
                f"`{name}{MODEL_STEP}` ({PLATFORMS[fmt][0]}, dynamic batching). {inputs} "
                "Output: `norm` float32 [N, 1]; normalisation is inside the graph.")
    else:
        what = (f"Input `{art.input_name}`: uint8 {shape}, NCHW, pre-processed as `oecl.json` "
                "says (resize rule, colour mode); normalisation is inside the graph. Output "
                "`norm`: float32 [N, 1].")
    if backend == "python" or image_bytes:
        # The Python backend imports oecl_runtime from the container's Python: its runtime
        # needs, then oecl itself (a wheel from `pip wheel --no-deps -w wheels .`).
        start = ("bash -c 'pip install \"numpy<2\" onnxruntime onnx Pillow \\\n"
                 "    && pip install --no-deps /wheels/oecl-*.whl \\\n"
                 "    && tritonserver --model-repository=/models'")
        mounts = " -v $PWD/wheels:/wheels"
        need = ("\nTriton's Python backend imports `oecl_runtime` from the container's Python, so "
                "the command installs it first (numpy < 2: with numpy 2 the Python backend's "
                "outputs came back empty in the Triton build this was tested with).\n")
    else:
        start, mounts, need = "tritonserver --model-repository=/models", "", ""
    return _TITLE + f"""`{name}`

Made by `oecl triton-repo` from `{art.directory.name}/{entry['path']}` ({entry['precision']}).
{what} Higher `norm` = normal; an image is anomalous when `norm < {art.threshold:.6g}` (the
artifact's threshold).
{trt_note}
## Serve
{need}
Triton's HTTP, gRPC and metrics ports go to 8010-8012 here, clear of `oecl serve`'s 8000:

```bash
docker run --rm {gpus}-p 8010:8000 -p 8011:8001 -p 8012:8002 \\
  -v {out.resolve()}:/models{mounts} nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
  {start}
```

## Call (Python, `pip install tritonclient[http]`)

The same call works against `oecl serve --model-name {name}` (its /v2 routes, port 8000).

```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("127.0.0.1:8010")
# your batch: N images of {spec.channels}x{spec.height}x{spec.width}, prepared as oecl.json says
images = np.zeros(({min(8, art.max_batch)}, {spec.channels}, {spec.height}, {spec.width}), np.uint8)
inp = httpclient.InferInput({art.input_name!r}, list(images.shape), "UINT8")
inp.set_data_from_numpy(images)
result = client.infer({name!r}, [inp], outputs=[httpclient.InferRequestedOutput("norm")])
norm = result.as_numpy("norm")[:, 0]
is_anomaly = norm < {art.threshold:.6g}
```
"""
