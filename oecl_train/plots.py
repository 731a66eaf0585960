"""Training plots: loss, and ID vs OE feature norm over training (the paper's Figure 1 view)."""

from __future__ import annotations

import json
from pathlib import Path

from oecl_runtime.atomic import with_file


def plot_training(run_dir: str | Path) -> list[Path]:
    # matplotlib is optional (the train extra) and slow to import; the backend must be chosen
    # before pyplot is imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    if not rows:
        return []
    epochs = [r["epoch"] for r in rows]
    out = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["loss"] for r in rows], label="total loss")
    ax.plot(epochs, [r["contrastive"] for r in rows], label="NT-Xent")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Training loss")
    fig.tight_layout()
    with_file(run_dir / "loss.png", lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    out.append(run_dir / "loss.png")

    # Constrained layout with the legend outside, below the axes: inside, it hid the α line.
    fig, ax = plt.subplots(figsize=(6, 4.4), layout="constrained")
    ax.plot(epochs, [r["id_norm"] for r in rows], label="ID ‖z‖")
    ax.plot(epochs, [r["oe_norm"] for r in rows], label="OE ‖z‖")
    ax2 = ax.twinx()
    ax2.step(
        epochs, [r["alpha"] for r in rows], color="gray", alpha=0.6, where="post",
        label="α (OE norm weight, right axis)",
    )
    ax2.set_ylabel("α", color="gray")
    ax2.set_ylim(bottom=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean feature norm (higher = normal)")
    handles = ax.get_lines() + ax2.get_lines()
    fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncol=3)
    ax.set_title("ID vs OE norm during training")
    with_file(run_dir / "norms.png", lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    out.append(run_dir / "norms.png")
    return out
