"""The `oecl.json` schema in executable form: what a received metadata object must hold before
the runtime reads anything it names, each refusal one line naming the offending key.

`docs/ARTIFACT.md` describes the same schema for clients in other languages.
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Any

from .names import CONSUMERS, DATA_PRECISIONS, FILE_FORMATS, PRECISIONS

# 2: the score may be the K-view mean-view-norm (`score.views`), and files[] may hold the
# golden set (`npy`). Version 1 artifacts (plain norm) are still read.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
METADATA_NAME = "oecl.json"

# Bounds on what a received oecl.json may ask the runtime to allocate: the server and the scorer
# hold a uint8 batch buffer of max_batch x C x H x W (max_batch 10**9 died in a MemoryError).
MAX_BATCH = 4096
MAX_SIDE = 8192
MAX_BATCH_BYTES = 1 << 30
MAX_PATH = 1024  # characters of a path listed in files[]

STAT_KEYS = ("n", "mean", "std", "min", "p05", "p50", "p95", "max")
# The graph computes the score either way; the name says which: the single-pass norm, or the
# norm of the mean projection over the fixed views listed in `score.views`.
SCORE_NAMES = ("norm", "mean-view-norm")
VIEW_KEYS = ("top", "left", "height", "width", "hflip")
_TOP_KEYS = ("schema_version", "producer", "created", "input", "outputs", "score", "max_batch",
             "files")


class ArtifactError(ValueError):
    """An artifact directory that cannot be used; the message is one line naming the cause."""


def _short(p: Any, limit: int = 120) -> str:
    """`p` as text, cut to `limit` characters (a received file may hold anything)."""
    text = str(p)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _r(v: Any) -> str:
    """`repr(v)`, cut like `_short`: how a value read from oecl.json appears in a message."""
    return _short(repr(v), 80)


def _need(cond: bool, reason: str) -> None:
    if not cond:
        raise ArtifactError(f"{METADATA_NAME}: {reason}")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true must not pass as 1


def _is_pos_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _check_relative(p: Any, where: str) -> None:
    _need(isinstance(p, str) and p != "", f"{where} must be a non-empty string")
    # Longer names than a file system holds would fail deep inside a path call instead.
    _need(len(p) <= MAX_PATH and "\0" not in p
          and all(len(part.encode("utf-8", "surrogatepass")) <= 255 for part in p.split("/")),
          f"{where} {_short(p)!r} is not a usable file name (at most {MAX_PATH} characters, "
          "255 bytes per part, no NUL)")
    pp = PurePosixPath(p)
    # Paths come from a file a user may have received: keep every read inside the directory.
    _need(not pp.is_absolute() and ".." not in pp.parts and "\\" not in p,
          f"{where} {_r(p)} must be relative to the artifact directory")


def _check_digest(sha: Any, size: Any, p: str) -> None:
    _need(isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha),
          f"{p}: sha256 must be 64 lowercase hex digits")
    _need(_is_int(size) and size >= 0, f"{p}: bytes must be an integer")


def _check_stats(stats: Any, where: str) -> None:
    _need(isinstance(stats, dict), f"{where} must be an object")
    missing = [k for k in STAT_KEYS if k not in stats]
    _need(not missing, f"{where} lacks {', '.join(missing)}")
    _need(all(_is_num(stats[k]) for k in STAT_KEYS), f"{where} values must be finite numbers")


def _check_file_entry(f: Any, i: int) -> None:
    _need(isinstance(f, dict), f"files[{i}] must be an object")
    for key in ("path", "format", "precision", "sha256", "bytes"):
        _need(key in f, f"files[{i}] lacks {key!r}")
    p = f["path"]
    _check_relative(p, f"files[{i}].path")
    _need(f["format"] in FILE_FORMATS, f"{p}: unknown format {_r(f['format'])}")
    known = DATA_PRECISIONS if f["format"] == "npy" else PRECISIONS
    _need(f["precision"] in known, f"{p}: unknown precision {_r(f['precision'])}")
    consumers = f.get("consumers")
    _need(consumers is None or (isinstance(consumers, list) and consumers
                                and all(c in CONSUMERS for c in consumers)),
          f"{p}: consumers must list some of {', '.join(CONSUMERS)}")
    _check_digest(f["sha256"], f["bytes"], p)
    ext = f.get("external_data", [])
    _need(ext == [] or (isinstance(ext, list) and f["format"] == "onnx"),
          f"{p}: external_data must be a list, and only an ONNX graph has it")
    for j, e in enumerate(ext):
        _need(isinstance(e, dict), f"{p}: external_data[{j}] must be an object")
        _check_relative(e.get("path"), f"{p}: external_data[{j}].path")
        _check_digest(e.get("sha256"), e.get("bytes"), e["path"])
    if f["format"] == "tensorrt":
        for key in ("tensorrt_version", "gpu_name", "compute_capability"):
            _need(isinstance(f.get(key), str) and f[key] != "",
                  f"{p}: a TensorRT plan needs {key!r} (plans only run where they were built)")


def _check_output(name: Any, out: Any) -> None:
    """One `outputs` entry: a float32 tensor whose `shape` is "batch" and then sizes."""
    where = f"outputs.{_short(name, 40)}"
    _need(isinstance(out, dict), f"{where} must be an object")
    _need(out.get("dtype", "float32") == "float32", f"{where}.dtype must be 'float32'")
    shape = out.get("shape", ["batch"])
    _need(isinstance(shape, list) and 1 <= len(shape) <= 8 and shape[0] == "batch"
          and all(_is_pos_int(d) and d <= 1 << 20 for d in shape[1:]),
          f"{where}.shape must be [\"batch\"] followed by positive sizes, got {_short(shape)}")


def _check_views(score: dict[str, Any], inp: dict[str, Any]) -> None:
    """`score.views` (optional for `norm`: absent means the plain view alone): boxes inside the
    input, view 0 the plain image, and more than one view exactly when the name says so."""
    views = score.get("views")
    if views is None:
        _need(score["name"] == "norm", f"score.name {_r(score['name'])} needs score.views")
        return
    _need(isinstance(views, list) and views, "score.views must list at least one view")
    h, w = inp["height"], inp["width"]
    for i, v in enumerate(views):
        _need(isinstance(v, dict) and all(k in v for k in VIEW_KEYS),
              f"score.views[{i}] needs {', '.join(VIEW_KEYS)}")
        ints = [v[k] for k in VIEW_KEYS[:4]]
        _need(all(isinstance(x, int) and not isinstance(x, bool) for x in ints)
              and isinstance(v["hflip"], bool), f"score.views[{i}]: whole pixels and a boolean")
        _need(v["top"] >= 0 and v["left"] >= 0 and v["height"] > 0 and v["width"] > 0
              and v["top"] + v["height"] <= h and v["left"] + v["width"] <= w,
              f"score.views[{i}] box lies outside the {h}x{w} input")
    plain = {"top": 0, "left": 0, "height": h, "width": w, "hflip": False}
    _need({k: views[0][k] for k in VIEW_KEYS} == plain, "score.views[0] must be the plain image")
    want = "norm" if len(views) == 1 else "mean-view-norm"
    _need(score["name"] == want, f"score.name must be {want!r} for {len(views)} view(s)")


def validate_metadata(meta: dict[str, Any]) -> None:
    """Raise ArtifactError (one line) unless `meta` follows a schema version this runtime reads
    (READABLE_VERSIONS)."""
    _need(isinstance(meta, dict), "top level must be a JSON object")
    version = meta.get("schema_version")
    _need(_is_int(version) and version in READABLE_VERSIONS,
          f"unknown schema_version {_r(version)} (this runtime reads "
          f"{', '.join(map(str, READABLE_VERSIONS))})")
    _need(version >= 2 or not isinstance(meta.get("score"), dict)
          or meta["score"].get("name", "norm") == "norm",
          f"schema_version {version} has only the plain norm score; "
          f"{_r(meta['score'].get('name') if isinstance(meta.get('score'), dict) else '')} "
          "needs schema_version 2")
    missing = [k for k in _TOP_KEYS if k not in meta]
    _need(not missing, f"missing key(s) {', '.join(missing)}")

    producer = meta["producer"]
    _need(isinstance(producer, dict) and isinstance(producer.get("name"), str)
          and isinstance(producer.get("version"), str), "producer needs name and version")
    _need(isinstance(meta["created"], str) and "T" in meta["created"],
          "created must be an ISO 8601 UTC time such as 2026-11-22T10:00:00Z")

    inp = meta["input"]
    _need(isinstance(inp, dict), "input must be an object")
    _need(isinstance(inp.get("name"), str) and inp["name"] != "", "input.name must be a string")
    _need(inp.get("dtype") == "uint8", f"input.dtype must be 'uint8', got {_r(inp.get('dtype'))}")
    _need(inp.get("layout") == "NCHW", f"input.layout must be 'NCHW', got {_r(inp.get('layout'))}")
    _need(_is_int(inp.get("channels")) and inp.get("channels") in (1, 3),
          f"input.channels must be 1 or 3, got {_r(inp.get('channels'))}")
    expected_mode = "L" if inp["channels"] == 1 else "RGB"
    _need(inp.get("color_mode") == expected_mode,
          f"input.color_mode must be {expected_mode!r} for {inp['channels']} channel(s)")
    _need(_is_pos_int(inp.get("height")) and _is_pos_int(inp.get("width"))
          and inp["height"] <= MAX_SIDE and inp["width"] <= MAX_SIDE,
          f"input.height and input.width must be integers from 1 to {MAX_SIDE}")
    _need(inp.get("resize") is None or (_is_pos_int(inp.get("resize"))
                                        and inp["resize"] <= MAX_SIDE),
          f"input.resize must be an integer from 1 to {MAX_SIDE} or null")
    _need(inp.get("interpolation") in ("bilinear", "nearest", "bicubic"),
          f"input.interpolation {_r(inp.get('interpolation'))} is not bilinear, nearest or bicubic")
    norm = inp.get("normalization")
    _need(isinstance(norm, dict) and norm.get("in_graph") is True,
          "input.normalization must say in_graph: true (the graph takes raw uint8)")
    for key in ("mean", "std"):
        v = norm.get(key)
        _need(isinstance(v, list) and len(v) == inp["channels"] and all(_is_num(x) for x in v),
              f"input.normalization.{key} must list one number per channel")
    _need(all(x > 0 for x in norm["std"]), "input.normalization.std must be positive")

    outputs = meta["outputs"]
    _need(isinstance(outputs, dict) and isinstance(outputs.get("norm"), dict),
          "outputs must describe 'norm'")
    _need(outputs["norm"].get("dtype") == "float32", "outputs.norm.dtype must be 'float32'")
    for name, out in outputs.items():
        _check_output(name, out)
    _need(outputs["norm"].get("shape", ["batch"]) == ["batch"],
          "outputs.norm.shape must be [\"batch\"]: one norm per image")

    score = meta["score"]
    _need(isinstance(score, dict), "score must be an object")
    _need(score.get("name") in SCORE_NAMES,
          f"score.name must be one of {', '.join(SCORE_NAMES)}, got {_r(score.get('name'))}")
    _check_views(score, inp)
    _need(score.get("direction") == "higher_is_normal",
          f"score.direction must be 'higher_is_normal', got {_r(score.get('direction'))}")
    # Norms are never negative: a negative threshold would call nothing anomalous.
    _need(_is_num(score.get("threshold")) and score["threshold"] >= 0,
          f"score.threshold must be a finite number >= 0, got {_short(score.get('threshold'))}")
    rule = score.get("threshold_rule")
    _need(isinstance(rule, dict) and isinstance(rule.get("method"), str),
          "score.threshold_rule must name its method")
    _check_stats(score.get("id_norm"), "score.id_norm")
    if score.get("oe_norm") is not None:
        _check_stats(score["oe_norm"], "score.oe_norm")

    _need(_is_pos_int(meta["max_batch"]) and meta["max_batch"] <= MAX_BATCH,
          f"max_batch must be an integer from 1 to {MAX_BATCH}, got {_r(meta['max_batch'])}")
    batch_bytes = meta["max_batch"] * inp["channels"] * inp["height"] * inp["width"]
    _need(batch_bytes <= MAX_BATCH_BYTES,
          f"max_batch {meta['max_batch']} of {inp['channels']}x{inp['height']}x{inp['width']} "
          f"images needs {batch_bytes} bytes per batch, over the {MAX_BATCH_BYTES} limit")
    if "architecture" in meta:
        _need(isinstance(meta["architecture"], dict), "architecture must be an object")

    files = meta["files"]
    _need(isinstance(files, list) and files, "files must list at least one model file")
    for i, f in enumerate(files):
        _check_file_entry(f, i)
    paths = [f["path"] for f in files]
    _need(len(set(paths)) == len(paths), "files lists the same path twice")
