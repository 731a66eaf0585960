"""`oecl score`: a row per image (path, norm, is_anomaly, error) for files, directories and
globs, as CSV or JSON lines; an image that cannot be scored is an error row, not the run's end."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..atomic import atomic_path
from ..files import os_reason, regular_file_problem, short_path
from ..names import IMAGE_EXTENSIONS
from .common import backend_options, model_option, open_scorer, say

if TYPE_CHECKING:
    from ..scorer import FileResult

_GLOB_CHARS = set("*?[")

class PathError(ValueError):
    """A path given to `oecl score` that does not exist: a usage error, not an error row."""


def expand_paths(paths: tuple[str, ...], problems: dict[str, str] | None = None) -> list[str]:
    """Files as given; directories walked recursively and globs expanded, keeping images only.

    Returns one entry per row `oecl score` writes, in order. Every path given must exist (a
    glob may match nothing): PathError names the first that does not. An entry that cannot be
    scored stays in the list with its reason in `problems`: a directory that cannot be listed,
    and anything but a regular file (a FIFO would block its read forever, a broken symlink has
    nothing to read). A named file is always kept; walked and globbed files are filtered by
    image extension.
    """
    out: list[str] = []
    found = {} if problems is None else problems

    def walk(d: str) -> Iterator[str]:
        unlisted: list[OSError] = []

        def directories_that_failed() -> Iterator[str]:
            # os.walk reports a directory it cannot list here, and otherwise leaves it out.
            while unlisted:
                e = unlisted.pop(0)
                where = os.fspath(e.filename) if e.filename is not None else d
                found[where] = f"cannot list this directory: {os_reason(e)}"
                yield where

        for root, dirs, files in os.walk(d, onerror=unlisted.append):
            yield from directories_that_failed()
            dirs.sort()
            for name in sorted(files):
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    yield os.path.join(root, name)
        yield from directories_that_failed()

    for p in paths:
        try:
            mode = os.stat(p).st_mode
        except OSError as e:
            if isinstance(e, FileNotFoundError) and _GLOB_CHARS & set(p) \
                    and not os.path.islink(p):
                for m in sorted(glob.glob(p, recursive=True)):
                    if os.path.isdir(m):
                        out.extend(walk(m))
                    elif Path(m).suffix.lower() in IMAGE_EXTENSIONS:
                        out.append(m)
                continue
            raise PathError(f"{short_path(p)}: {regular_file_problem(p)}; give image files, "
                            "directories or globs that exist") from None
        if stat.S_ISDIR(mode):
            out.extend(walk(p))
        else:
            out.append(p)
    seen: set[str] = set()
    entries = [p for p in out if not (p in seen or seen.add(p))]
    for p in entries:
        if p not in found:
            reason = regular_file_problem(p)
            if reason is not None:
                found[p] = reason
    return entries


def _printable(text: str) -> str:
    """A file name that is not valid UTF-8 (held as surrogate escapes) with \\xNN for its odd
    bytes: a row file stays valid UTF-8 and still says which bytes the name has."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _RowWriter:
    """CSV or JSON-lines rows: path, norm, is_anomaly, error."""

    FIELDS = ("path", "norm", "is_anomaly", "error")

    def __init__(self, stream: Any, fmt: str) -> None:
        self.fmt, self.stream = fmt, stream
        if fmt == "csv":
            self._csv = csv.writer(stream, lineterminator="\n")
            self._csv.writerow(self.FIELDS)

    def write(self, r: FileResult) -> None:
        import numpy as np  # deferred: `oecl --help` does without numpy

        # str(float32) is the shortest text that reads back as the same float32.
        text = None if r.norm is None else str(np.float32(r.norm))
        path = _printable(r.path)
        error = None if r.error is None else _printable(r.error)
        if self.fmt == "csv":
            flag = "" if r.is_anomaly is None else str(r.is_anomaly).lower()
            self._csv.writerow((path, text or "", flag, error or ""))
        else:
            row = {"path": path, "norm": None if text is None else float(text),
                   "is_anomaly": r.is_anomaly, "error": error}
            self.stream.write(json.dumps(row) + "\n")


def _check_threshold(ctx: click.Context, param: click.Parameter,
                     value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(f"must be a finite number >= 0 (norms are >= 0), got {value}")
    return value


@click.command("score")
@click.argument("paths", nargs=-1, required=True)
@model_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write rows to FILE.csv or FILE.jsonl (default: CSV on stdout); written "
                   "whole or not at all.")
@click.option("--threshold", type=float, default=None, callback=_check_threshold,
              help="Anomaly when norm < threshold (finite, >= 0); default: the artifact's "
                   "threshold.")
@backend_options
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per inference call; default: the backend's maximum.")
@click.option("--workers", type=click.IntRange(min=1), default=min(8, os.cpu_count() or 1),
              show_default=True, help="Threads decoding images.")
@click.option("--strict", is_flag=True, help="Exit with status 1 if any image failed.")
def score(paths: tuple[str, ...], model_dir: Path, out: Path | None, threshold: float | None,
          backend: str, precision: str | None, threads: int | None, batch_size: int | None,
          workers: int, strict: bool) -> None:
    """Score image files, directories (recursive) and globs. norm: higher = normal.

    Each image gets a row (path, norm, is_anomaly, error); an image that cannot be scored
    becomes an error row and the run goes on: an unreadable or corrupt file, anything but a
    regular file (a FIFO, a broken symlink), a directory that cannot be listed, a non-finite
    norm. A path that does not exist is a usage error. Paths that are not valid UTF-8 are
    written with \\xNN escapes.
    """
    fmt = "csv"
    if out is not None:
        fmt = {".csv": "csv", ".jsonl": "jsonl"}.get(out.suffix.lower(), "")
        if not fmt:
            raise click.BadParameter("must end in .csv or .jsonl", param_hint="--out")
    problems: dict[str, str] = {}
    try:
        files = expand_paths(paths, problems)
    except PathError as e:
        raise click.BadParameter(str(e), param_hint="PATHS") from None
    if not files:
        raise click.ClickException("no images found in " + " ".join(map(short_path, paths)))
    scorer = open_scorer(model_dir, backend, precision, threshold, batch_size, threads)
    try:
        with ExitStack() as stack:
            stack.callback(scorer.close)
            stream = sys.stdout
            if out is not None:
                tmp = stack.enter_context(atomic_path(out))
                stream = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
            say(f"scoring {len(files)} images with {scorer.backend.name} "
                f"({scorer.backend.precision}), threshold {scorer.threshold:g}; "
                f"{_direction(scorer)}")
            results = _with_problems(files, problems, scorer, workers)
            counts = _write_rows(results, len(files), _RowWriter(stream, fmt))
    except OSError as e:  # file-size limit, full disk, read-only directory: nothing is left
        where = "stdout" if out is None else short_path(out)
        raise click.ClickException(f"cannot write {where}: {os_reason(e)}") from None
    n, anomalies, errors, seconds = counts
    say(f"{n} images: {n - errors} scored, {anomalies} anomalies (norm < {scorer.threshold:g}), "
        f"{errors} errors; {n / seconds:.1f} images/s; {_direction(scorer)}"
        + (f"; wrote {short_path(out)}" if out else ""))
    if strict and errors:
        raise SystemExit(1)


def _with_problems(files: list[str], problems: dict[str, str], scorer: Any,
                   workers: int) -> Iterator[FileResult]:
    """A result per entry of `files`, in order: the scorer's for each scorable file, an error
    row for each entry with a known problem (never opened)."""
    from ..scorer import FileResult  # deferred: the scorer loads numpy

    scored = scorer.score_files([p for p in files if p not in problems], workers=workers)
    for p in files:
        yield FileResult(p, error=problems[p]) if p in problems else next(scored)


def _finite(r: FileResult) -> FileResult:
    """A non-finite norm is an error for that image, never a decision (NaN < t is False:
    it would be counted as normal)."""
    if r.error is None and r.norm is not None and not math.isfinite(r.norm):
        from ..scorer import FileResult  # deferred: the scorer loads numpy

        return FileResult(r.path, error=f"the model returned a non-finite norm ({r.norm}) for "
                                        "this image; the model file is broken or the image "
                                        "drives it out of range")
    return r


def _write_rows(results: Iterator[FileResult], total: int,
                writer: _RowWriter) -> tuple[int, int, int, float]:
    """Rows for `results` under a progress bar: (images, anomalies, errors, seconds)."""
    from tqdm import tqdm  # deferred: it takes longer to import than `--help` to answer

    n = anomalies = errors = 0
    t0 = time.perf_counter()
    with tqdm(total=total, unit="img", file=sys.stderr, disable=None) as bar:
        for r in map(_finite, results):
            writer.write(r)
            n += 1
            anomalies += r.error is None and bool(r.is_anomaly)
            errors += r.error is not None
            bar.update()
    return n, anomalies, errors, max(time.perf_counter() - t0, 1e-9)


def _direction(scorer: Any) -> str:
    """What the `norm` column holds, and which way is normal."""
    name = scorer.artifact.score_name
    return "norm: higher = normal" if name == "norm" else f"norm = {name}: higher = normal"
