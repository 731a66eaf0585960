"""The `oecl` command. Verbs are imported only when called, so `oecl --help` stays instant
and `oecl score/serve/bench` never import torch."""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

import click

from oecl_runtime import __version__

# verb -> "module:attribute" of its click command
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
    "score": ("oecl_runtime.cli", "score", "Score images with an exported model (no torch)."),
    "serve": ("oecl_runtime.cli", "serve", "Serve an exported model over HTTP."),
    "bench": ("oecl_runtime.cli", "bench", "Measure scoring latency and throughput."),
    "verify": ("oecl_runtime.cli", "verify", "Check a backend here on the artifact's golden set."),
    "engine": ("oecl_runtime.cli", "engine", "Build and record TensorRT engines on this GPU."),
    "triton-repo": ("oecl_runtime.cli", "triton_repo", "Write a Triton Inference Server model "
                    "repository."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(VERBS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in VERBS:
            return None
        module, attr, _ = VERBS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise click.ClickException(f"'oecl {name}' is unavailable: {e}") from e

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table, so listing the verbs imports nothing heavy.
        with formatter.section("Commands"):
            formatter.write_dl([(name, VERBS[name][2]) for name in VERBS])


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
