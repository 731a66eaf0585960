"""One markdown summary (gpu-check.md) of the JSON that gpu_check.sh's steps wrote.

    python benchmarks/gpu_check_summary.py RESULTS_DIR

Exits non-zero when a step failed or wrote nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _harness import md_table
from bench_loss import markdown_table
from bench_score_gpu import markdown_table as score_table


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _times(result: dict) -> str:
    sp = result.get("speedup_vs_reference")
    return f"{sp:.2f}x" if sp else "-"


def summarize(folder: Path) -> tuple[str, bool]:
    lines, ok = ["# GPU check", ""], True
    steps = [json.loads(ln) for ln in (folder / "gpu-check-steps.jsonl").read_text().splitlines()
             if ln.strip()]
    lines += md_table(["step", "exit code", "seconds"],
                      [[s["step"], s["rc"], s["seconds"]] for s in steps])
    ok &= all(s["rc"] == 0 for s in steps)
    loss_path = _newest(folder, "loss-*.json")
    if loss_path is not None:
        loss = _load(loss_path)
        impls = list(dict.fromkeys(r["impl"] for r in loss["results"]))
        lines += ["", f"## Loss ({loss['meta']['device']}, d = 128)", "",
                  markdown_table(loss["results"], impls)]
    else:
        ok = False
    train_path = _newest(folder, "train-*.json")
    if train_path is not None:
        train = _load(train_path)
        c = train["config"]
        lines += ["", f"## Training ({train['device']}, {c['depth']} width {c['width']}, "
                  f"{c['image_size']}x{c['image_size']}x{c['channels']}, batch "
                  f"{c['batch_size']} ID + {c['batch_size']} OE)", "",
                  *md_table(["pipeline", "images/s", "vs reference"],
                            [[name, f"{r['images_per_s']:.1f}", _times(r)]
                             for name, r in train["results"].items()])]
    else:
        ok = False
    score_path = _newest(folder, "score-*.json")
    if score_path is not None:
        score = _load(score_path)
        ceiling = score["ceiling_images_per_s"]
        lines += ["", f"## Scoring ({score['device']}; onnxruntime on {score['cpu']}; "
                  f"ceiling {f'{ceiling:,.0f} images/s' if ceiling else 'n/a'})", "",
                  score_table(score["results"])]
    else:
        ok = False
    return "\n".join(lines) + "\n", ok


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: gpu_check_summary.py RESULTS_DIR", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    text, ok = summarize(folder)
    (folder / "gpu-check.md").write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
