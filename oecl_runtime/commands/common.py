"""What the runtime's commands share: the model and backend options, options built from a
configuration dataclass's fields (and the dataclass back from their values), and opening a
scorer with one-line errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..names import BACKEND_CHOICES, PRECISIONS

C = TypeVar("C")


def model_option(f: Any) -> Any:
    return click.option("--model", "model_dir", required=True,
                        type=click.Path(exists=True, file_okay=False, path_type=Path),
                        help="Artifact directory (oecl.json + model files).")(f)


def artifact_argument(f: Any) -> Any:
    return click.argument("artifact", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path))(f)


def backend_options(f: Any) -> Any:
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU intra-op threads of onnxruntime-cpu / torch-cpu; default: one "
                          "per physical core.")(f)
    f = click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="Model file precision; default: fp32 where present.")(f)
    return click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto",
                        show_default=True,
                        help="auto: tensorrt > onnxruntime-cuda > torch-cuda > onnxruntime-cpu.")(f)


def open_scorer(model_dir: Path, backend: str, precision: str | None, threshold: float | None,
                batch_size: int | None = None, threads: int | None = None) -> Any:
    # Deferred: the scorer and its backends load numpy, onnxruntime or torch.
    from ..artifact import METADATA_NAME, ArtifactError
    from ..backends import BackendUnavailable
    from ..scorer import Scorer

    if not (model_dir / METADATA_NAME).is_file() and (model_dir / "config.json").is_file():
        # A training run (what `oecl train` writes) is not servable until it is exported.
        raise click.ClickException(
            f"{model_dir} is a training run directory, not a model artifact (no "
            f"{METADATA_NAME}); make one with: oecl export {model_dir} --out DIR, then pass "
            "--model DIR"
        )
    try:
        return Scorer.open(model_dir, backend=backend, precision=precision, threshold=threshold,
                           batch_size=batch_size, threads=threads)
    except (ArtifactError, BackendUnavailable, ValueError) as e:
        raise click.ClickException(str(e)) from None


def checked(check: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback of `check`, whose ValueError becomes the option's usage error."""
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return check(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return callback


def field_options(cls: type, *names: str) -> Callable[[Any], Any]:
    """The options of fields `names` of dataclass `cls`, in that order, each named after its
    field: flag, help text, click type and check from the field's metadata (`serving.config.
    option`), the default from the field, so that a default is written once."""
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def add(fn: Any) -> Any:
        for name in reversed(names):  # click lists a command's options bottom-up
            f = fields[name]
            meta = f.metadata["option"]
            flag = meta["flag"] or "--" + name.replace("_", "-")
            kw: dict[str, Any] = {"help": meta["help"]}
            if isinstance(f.default, bool):
                kw.update(is_flag=True, default=f.default)
            elif meta["unset"]:
                kw.update(type=meta["type"], default=None)
            else:
                kw.update(type=meta["type"], default=f.default, show_default=meta["show_default"])
            if meta["check"] is not None:
                kw["callback"] = checked(meta["check"])
            fn = click.option(flag, name, **kw)(fn)
        return fn

    return add


def config_from(cls: type[C], options: dict[str, Any], **given: Any) -> C:
    """`cls` from a command's option values named after its fields (None: the field's default),
    and the fields in `given`."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in options.items() if k in names and v is not None}
    return cls(**values, **given)


def say(msg: str) -> None:
    click.echo(msg, err=True)
