"""The `oecl` command. Verbs are imported only when called, so `oecl --help` stays instant
and `oecl score/serve/bench` never import torch."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

import click

from oecl_runtime import __version__
from oecl_runtime.verbs import RUNTIME_VERBS, VerbGroup

# verb -> (module, attribute of its click command, short help): training's, then the runtime's
VERBS = {
    "quickstart": (
        "oecl_train.quickstart",
        "quickstart",
        "Train OECL on bundled digits and report AUROC.",
    ),
    "train": ("oecl_train.train_cli", "train", "Train an OECL / self-OECL / SimCLR model."),
    "eval": ("oecl_train.evaluate_cli", "eval_cmd", "Evaluate a run: scores, OOD metrics, plots."),
    "export": (
        "oecl_train.export_cli",
        "export_cmd",
        "Export a run to ONNX / TensorRT + oecl.json.",
    ),
    **RUNTIME_VERBS,
}


class LazyGroup(VerbGroup):
    verbs = VERBS


def version_text() -> str:
    """oecl's version and what decides where it runs: torch and its CUDA, onnxruntime."""
    try:
        ours = version("oecl")
    except PackageNotFoundError:  # run from a checkout that is not installed
        ours = __version__
    lines = [f"oecl {ours}"]
    # Imported here: torch is optional and both are slow to import, which `oecl --help` and
    # every runtime verb would pay for otherwise.
    try:
        import torch

        if torch.cuda.is_available():
            gpus = f"{torch.cuda.device_count()} GPU(s), {torch.cuda.get_device_name(0)}"
        else:
            gpus = "no GPU visible"
        lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; {gpus})")
    except ImportError:
        lines.append("torch: not installed (oecl train/eval/export need it; scoring does not)")
    try:
        import onnxruntime

        providers = ", ".join(onnxruntime.get_available_providers())
        lines.append(f"onnxruntime {onnxruntime.__version__} ({providers})")
    except ImportError:
        lines.append("onnxruntime: not installed")
    return "\n".join(lines)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Show oecl's, torch's (CUDA) and onnxruntime's "
              "versions and exit.")
def main() -> None:
    """oecl: out-of-distribution detection by the feature norm of contrastive networks (OECL).

    Score direction everywhere: norm, higher = normal.
    """


if __name__ == "__main__":
    sys.exit(main())
