"""`oecl export`: a trained run to a served artifact (ONNX / TensorRT + oecl.json), verified."""

from __future__ import annotations

import json
from typing import Any

import click

from oecl_runtime.errors import one_line
from oecl_runtime.names import EXPORT_FORMATS
from oecl_train.errors import user_errors


@click.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact directory to write (replaced only if it already holds an artifact).")
@click.option("--format", "formats", default="onnx", show_default=True,
              help=f"Comma-separated files to make: {', '.join(EXPORT_FORMATS)}. The fp32 ONNX "
                   "file is always made, and so is model.safetensors (the fp32 weights, for the "
                   "runtime's torch backend); tensorrt needs TensorRT and a GPU.")
@click.option("--max-batch", default=64, show_default=True, type=click.IntRange(min=1),
              help="Largest batch the files are built and checked for.")
@click.option("--threshold-tpr", default=0.95, show_default=True,
              type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Default threshold: the norm that keeps this share of held-out ID images.")
@click.option("--embedding/--no-embedding", default=False, show_default=True,
              help="Also output the 128-d projection as `embedding`.")
@click.option("--calib-images", default=256, show_default=True, type=click.IntRange(min=1),
              help="ID training images that calibrate the int8 file.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Score held-out images with PyTorch and with every file through the runtime; "
                   "fail the export outside the tolerances.")
@click.option("--device", default="cpu", show_default=True,
              help="Device of the PyTorch reference (cpu, cuda, auto).")
@click.option("--views", default=None, type=click.IntRange(min=1),
              help="K fixed views per image inside the graph (the plain image and K - 1 crops "
                   "of the training family); the score is the norm of the mean projection. "
                   "1 = single pass. Default: oecl_model.views.DEFAULT_VIEWS.")
def export_cmd(run: str, out_dir: str, formats: str, max_batch: int, threshold_tpr: float,
               embedding: bool, calib_images: int, verify: bool, device: str,
               views: int | None) -> None:
    """Export the latest checkpoint of RUN to an artifact directory.

    The directory gets oecl.json, model.onnx, the --format variants, model.safetensors
    (always: the fp32 weights the torch backend serves), the golden set and verify.json (the
    parity check, unless --no-verify).

    Score: the norm of the projection averaged over the --views fixed views (mean-view-norm;
    norm with --views 1), higher = normal; an image is anomalous when the score < threshold.
    Progress goes to stderr; the table and a JSON summary (last line) go to stdout.
    """
    # torch is imported once the verb runs, so that `oecl export --help` does without it.
    from oecl_train.export import export_run

    try:
        summary = export_run(run, out_dir, formats, max_batch=max_batch,
                             threshold_tpr=threshold_tpr, embedding=embedding,
                             calib_images=calib_images, verify=verify, device=device,
                             views=views)
    except user_errors() as e:
        raise click.ClickException(one_line(e)) from None
    print_summary(summary)




def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_summary(summary: dict[str, Any]) -> None:
    click.echo(f"artifact: {summary['artifact']}")
    report = summary.get("verification")
    checked = {r["path"]: r for r in report["files"]} if report else {}
    head = f"{'file':<25} {'format':<12} {'prec':<5} {'size':>9}"
    if report:
        head += f" {'max rel':>9} {'mean rel':>9} {'rank':>7} {'AUROC':>7}  check"
    click.echo(head)
    for f in summary["files"]:
        line = f"{f['path']:<25} {f['format']:<12} {f['precision']:<5} {_size(f['bytes']):>9}"
        r = checked.get(f["path"])
        if r:
            rank = "n/a" if r["rank_correlation"] is None else f"{r['rank_correlation']:.4f}"
            line += (f" {r['max_rel_diff']:>9.2e} {r['mean_rel_diff']:>9.2e} {rank:>7}"
                     f" {r['AUROC']:>7.4f}  {'pass' if r['pass'] else 'FAIL'}")
        click.echo(line)
    if report:
        # A parity check between the files and PyTorch, on its own image sample: not the test
        # AUROC `oecl train` / `oecl eval` report (docs/ARTIFACT.md, `verify.json`).
        click.echo(f"parity check on a sample of {report['n_id']} ID (validation + test) + "
                   f"{report['n_ood']} OOD test images: PyTorch fp32 AUROC "
                   f"{report['reference']['AUROC']:.4f} there; fp32 files are judged on max rel, "
                   "fp16/int8 on mean rel and rank (Spearman) against PyTorch (the test AUROC, "
                   "on the whole test split, is what oecl train and oecl eval print)")
    else:
        click.echo("not verified (--no-verify)")
    rule = summary["threshold_rule"]
    score = summary["score"].split(" ")[0]
    click.echo(f"threshold {summary['threshold']:.4g} ({score} keeping {rule['tpr']:.0%} of "
               f"{rule['n_images']} ID-validation images over {summary['views']} view(s), fp32; "
               f"score: {score}, higher = normal)")
    click.echo(json.dumps(summary))
