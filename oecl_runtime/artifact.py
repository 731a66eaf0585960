"""The model artifact: `oecl.json` beside the model files, validated before any use.

The exporter builds the metadata with `file_entry` and writes it with `write_metadata`; the
runtime reads it with `Artifact.open`. The schema lives in `artifact_schema`, the file checks
in `artifact_files`; their public names are importable from here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifact_files import (
    _beside,
    _check_relative_ref,
    _inside,
    file_entry,
    onnx_external_data,
    sha256_file,
)
from .artifact_schema import (
    METADATA_NAME,
    SCHEMA_VERSION,
    ArtifactError,
    _r,
    _short,
    validate_metadata,
)
from .atomic import write_json
from .errors import one_line
from .names import CONSUMERS
from .preprocess import InputSpec

__all__ = [
    "METADATA_NAME", "SCHEMA_VERSION", "Artifact", "ArtifactError", "file_entry",
    "onnx_external_data", "sha256_file", "update_files", "validate_metadata", "write_metadata",
]


def write_metadata(directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Validate `meta` and write it atomically as `<directory>/oecl.json`."""
    validate_metadata(meta)
    path = Path(directory) / METADATA_NAME
    write_json(path, meta)
    return path


def update_files(directory: str | os.PathLike, add: Iterable[dict[str, Any]] = (),
                 remove: Iterable[str] = ()) -> dict[str, Any]:
    """Drop the `files[]` entries of paths in `remove` and those `add` replaces, append `add`,
    and rewrite `oecl.json` atomically; every other key is kept as it was. Returns the new
    metadata. Used to record an engine built after export (`oecl engine`)."""
    path = Path(directory) / METADATA_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e
    validate_metadata(meta)
    add = list(add)
    gone = set(remove) | {f["path"] for f in add}
    meta["files"] = [f for f in meta["files"] if f["path"] not in gone] + add
    write_metadata(directory, meta)
    return meta


@dataclass(frozen=True)
class Artifact:
    """A validated artifact directory: metadata, and model files checked when first used.

    `open` validates `oecl.json` and keeps every listed path inside the directory; a file's
    presence, size and hash (with `verify`) and, for ONNX, the external data it loads are
    checked by `path_of`, the one way to a file's path. So a command checks exactly the files
    it opens: int8 scoring works with `model.onnx` gone, and a damaged file it opens is refused.
    """

    directory: Path
    meta: dict[str, Any]
    verify: bool = True
    _checked: set[str] = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def open(cls, directory: str | os.PathLike, verify: bool = True) -> Artifact:
        """Read and validate `oecl.json`; `verify`: hash each file before it is used.

        Raises ArtifactError with a one-line reason naming the offending key or file.
        """
        directory = Path(directory)
        try:
            if not directory.is_dir():
                raise ArtifactError(f"artifact directory not found: {_short(directory)}")
            # Every path is resolved (symlinks followed) and must stay inside the directory; a
            # symlink inside the artifact could otherwise make oecl.json read and hash any file.
            directory = directory.resolve(strict=True)
        except (OSError, RuntimeError) as e:  # a name too long, a symlink loop, no permission
            raise ArtifactError(f"cannot open artifact directory {_short(directory)}: "
                                f"{one_line(e)}") from e
        meta_path = _inside(directory, METADATA_NAME)
        if not meta_path.is_file():
            raise ArtifactError(f"no {METADATA_NAME} in {directory}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{meta_path} is not valid JSON: {one_line(e)}") from e
        except RecursionError as e:
            raise ArtifactError(f"{meta_path} nests too deeply to be an {METADATA_NAME}") from e
        except OSError as e:
            raise ArtifactError(f"cannot read {meta_path}: {one_line(e)}") from e
        validate_metadata(meta)
        for f in meta["files"]:
            _inside(directory, f["path"])
            for e in f.get("external_data", []):
                _inside(directory, _beside(f["path"], e["path"]))
        return cls(directory, meta, verify)

    def path_of(self, entry: dict[str, Any]) -> Path:
        """The path of a file listed in `files[]`, checked on first use: present, of the listed
        size and hash (with `verify`), and an ONNX graph loads no file the listing does not
        hash. Raises ArtifactError naming the file (and, when missing, what remakes it)."""
        path = _inside(self.directory, entry["path"])
        if entry["path"] not in self._checked:
            self._check_file(entry)
            self._checked.add(entry["path"])
        return path

    def _check_file(self, f: dict[str, Any]) -> None:
        self._check_one(f, f)
        if f["format"] != "onnx":
            return
        listed = {e["path"]: e for e in f.get("external_data", [])}
        for e in listed.values():
            self._check_one({**e, "path": _beside(f["path"], e["path"])}, f)
        for ref in onnx_external_data(_inside(self.directory, f["path"])):
            _check_relative_ref(ref, f["path"])
            _inside(self.directory, _beside(f["path"], ref))
            if ref not in listed:
                raise ArtifactError(f"{f['path']} loads external data {_r(ref)} that "
                                    f"{METADATA_NAME} does not hash (files[].external_data)")

    def _check_one(self, f: dict[str, Any], owner: dict[str, Any]) -> None:
        path = _inside(self.directory, f["path"])
        if not path.is_file():
            raise ArtifactError(f"missing file {f['path']} listed in {METADATA_NAME}; "
                                f"{self._remake(owner)}")
        if not self.verify:
            return
        try:
            size = path.stat().st_size
            if size != f["bytes"]:
                raise ArtifactError(
                    f"{f['path']} is {size} bytes but {METADATA_NAME} says {f['bytes']} "
                    "(truncated or replaced)"
                )
            digest = sha256_file(path)
        except OSError as e:  # no permission, an I/O error
            raise ArtifactError(f"cannot read {f['path']}: {one_line(e)}") from e
        if digest != f["sha256"]:
            raise ArtifactError(
                f"{f['path']} sha256 {digest[:12]}... does not match {METADATA_NAME} "
                f"({f['sha256'][:12]}...): the file changed after export"
            )

    def _remake(self, entry: dict[str, Any]) -> str:
        """What makes a listed file again: `oecl engine` for a plan, else `oecl export`."""
        if entry["format"] == "tensorrt":
            return (f"rebuild it on this GPU with `oecl engine {self.directory} --precision "
                    f"{entry['precision']}`")
        source = self.meta.get("source")
        run = source.get("run") if isinstance(source, dict) else None
        run = run if isinstance(run, str) and run else "RUN_DIR"
        return f"remake the artifact with `oecl export {run} --out {self.directory}`"

    # ---- convenient views of the metadata

    @property
    def spec(self) -> InputSpec:
        return InputSpec.from_json(self.meta["input"])

    @property
    def input_name(self) -> str:
        return str(self.meta["input"]["name"])

    @property
    def score_name(self) -> str:
        return str(self.meta["score"]["name"])

    @property
    def views(self) -> list[dict[str, Any]]:
        """The fixed views the graph averages over (the plain view alone when not listed)."""
        spec = self.meta["input"]
        plain = {"top": 0, "left": 0, "height": spec["height"], "width": spec["width"],
                 "hflip": False}
        return [dict(v) for v in self.meta["score"].get("views") or [plain]]

    @property
    def threshold(self) -> float:
        return float(self.meta["score"]["threshold"])

    @property
    def max_batch(self) -> int:
        return int(self.meta["max_batch"])

    @property
    def mean(self) -> list[float]:
        return [float(x) for x in self.meta["input"]["normalization"]["mean"]]

    @property
    def std(self) -> list[float]:
        return [float(x) for x in self.meta["input"]["normalization"]["std"]]

    @property
    def files(self) -> list[dict[str, Any]]:
        return list(self.meta["files"])

    def find(self, fmt: str, precision: str | None = None,
             consumer: str = "onnxruntime") -> dict[str, Any] | None:
        """The first file of `fmt` (and `precision`, if given) meant for `consumer`; fp32 first
        when unspecified. A file without `consumers` serves anyone; the int8 ONNX files name
        theirs, since onnxruntime and TensorRT each need a different form of quantisation."""
        matches = [f for f in self.meta["files"] if f["format"] == fmt
                   and consumer in f.get("consumers", CONSUMERS)]
        if precision is not None:
            matches = [f for f in matches if f["precision"] == precision]
        else:
            matches.sort(key=lambda f: f["precision"] != "fp32")
        return matches[0] if matches else None

    def require(self, fmt: str, precision: str | None = None,
                consumer: str = "onnxruntime") -> dict[str, Any]:
        f = self.find(fmt, precision, consumer)
        if f is None:
            have = ", ".join(f"{x['path']} ({x['format']}/{x['precision']})"
                             for x in self.meta["files"])
            want = fmt if precision is None else f"{fmt}/{precision}"
            if consumer != "onnxruntime":
                want += f" for {consumer}"
            raise ArtifactError(f"artifact {self.directory} has no {want} file (it has: {have})")
        return f
