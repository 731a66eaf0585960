"""Names shared by the artifact schema, the backends and the CLI (no imports: the CLI's
option choices come from here without loading numpy or any backend)."""

# What `oecl export --format` can make.
EXPORT_FORMATS = ("onnx", "onnx-fp16", "onnx-int8", "tensorrt")
# The `format` of a file in the artifact's `files[]`.
FILE_FORMATS = ("onnx", "tensorrt", "safetensors", "npy")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# dtypes of the golden set's `.npy` files (images and labels are uint8, reference norms fp32).
DATA_PRECISIONS = ("uint8", "fp32")
# TensorRT engines `oecl engine` builds.
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
# Who a model file is meant for, where it matters (the two int8 ONNX files differ in form).
CONSUMERS = ("onnxruntime", "tensorrt")

# "onnxruntime" and "torch" pick their device; the suffixed names force one.
BACKEND_CHOICES = (
    "auto", "tensorrt", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda",
    "onnxruntime-tensorrt", "torch", "torch-cpu", "torch-cuda",
)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)

# The model's name in `oecl triton-repo`'s repository and under `oecl serve`'s /v2 routes.
TRITON_MODEL_NAME = "oecl"
# The Open Inference Protocol input of encoded images (BYTES [N]), beside the artifact's own.
BYTES_INPUT = "image_bytes"
# Decoded pixels allowed per image. Pillow's own bomb limit (89 M pixels) lets a 420 KB PNG
# cost 2.5 s and 690 MB; the model input is tiny, so a camera-sized frame is plenty.
DEFAULT_MAX_PIXELS = 4096 * 4096


def valid_model_name(name: str) -> bool:
    """A name Triton accepts as a directory and a URL path segment, and pbtxt as a string."""
    return bool(name) and not name.startswith(".") and all(
        c.isascii() and (c.isalnum() or c in "-_.") for c in name)
