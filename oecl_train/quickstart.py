"""`oecl quickstart`: OECL on scikit-learn's bundled digits, trained and evaluated in minutes.

The settings are sized for a 2-core CPU: a one-block-per-stage ResNet of width 32 at 16x16
(digits are 8x8), bf16, and no horizontal flips (a mirrored digit is a different shape).
"""

from __future__ import annotations

import click

from oecl_train.config import TrainConfig
from oecl_train.data.reader_base import progress_enabled
from oecl_train.errors import user_errors
from oecl_train.train_cli import print_result

QUICKSTART = dict(
    data="digits",
    id_class="0",
    oe="photos",
    image_size=16,
    depth="resnet10",
    width=32,
    batch_size=64,
    steps=600,
    precision="bf16",
    hflip=False,
)


@click.command()
@click.option("--id-class", default="0", show_default=True, help="Digit used as the ID class.")
@click.option("--steps", default=QUICKSTART["steps"], show_default=True, help="Training steps.")
@click.option("--out-dir", default="runs", show_default=True, help="Where the run is written.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on stderr (default: only when stderr is a terminal).",
)
def quickstart(id_class: str, steps: int, out_dir: str, progress: bool | None) -> None:
    """Train OECL on scikit-learn's bundled digits (one class ID, natural-photo crops as OE),
    then score the held-out images of all classes by feature norm and print the AUROC."""
    # torch is imported once the verb runs, so that `oecl quickstart --help` does without it.
    from oecl_train.training import run_training

    progress = progress_enabled(progress)
    try:
        cfg = TrainConfig.from_dict(
            {
                **QUICKSTART,
                "id_class": id_class,
                "steps": steps,
                "out_dir": out_dir,
                "name": f"quickstart-digit{id_class}",
            }
        )
        cfg.validate()
        # The quickstart reports AUROC and sets no threshold: a digit class is too small to
        # hold out the 100 validation images a stable one needs, and saying so to every new
        # user would only be noise (`oecl train` on the same data says it).
        result = run_training(cfg, progress=progress, warn_threshold=False)
    except user_errors() as e:
        raise click.ClickException(str(e)) from None
    print_result(result)
