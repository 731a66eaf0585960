"""Names shared by the artifact schema, the backends and the CLI (no imports: the CLI's
option choices come from here without loading numpy or any backend)."""

FORMATS = ("onnx", "tensorrt", "safetensors")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

# "onnxruntime" and "torch" pick their device; the suffixed names force one.
BACKEND_CHOICES = (
    "auto", "tensorrt", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda",
    "onnxruntime-tensorrt", "torch", "torch-cpu", "torch-cuda",
)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)
