"""The summary of a gpu_check.sh run so far: gpu-check.md (tables) and gpu-check.json (the same
as data) in the output folder, from the steps' files in the work folder and the run's records
in gpu-check.jsonl. gpu_check.sh calls it after every step, so the summary is current however
the run ends.

    python benchmarks/gpu_check_summary.py WORK_DIR OUT_DIR

Exits non-zero when a step of this run failed or wrote nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from _harness import md_table
from bench_loss import markdown_table
from bench_score_gpu import markdown_table as score_table

from oecl_runtime.atomic import write_json, write_text

# The file each step leaves in the work folder.
STEP_FILES = {"pytest": "pytest.xml", "targets": "targets.json", "loss": "loss-*.json",
              "train": "train-*.json", "score": "score-*.json"}


def _load(folder: Path, pattern: str) -> dict | None:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def this_run(jsonl: Path) -> tuple[dict | None, list[dict]]:
    """(the last preflight record, the step records after it)."""
    preflight, steps = None, []
    lines = jsonl.read_text().splitlines() if jsonl.exists() else []
    for rec in (json.loads(ln) for ln in lines if ln.strip()):
        if rec.get("kind") == "preflight":
            preflight, steps = rec, []
        elif rec.get("kind") == "step":
            steps.append(rec)
    return preflight, steps


def _times(result: dict) -> str:
    sp = result.get("speedup_vs_reference")
    return f"{sp:.2f}x" if sp else "-"


def _settings(r: dict) -> str:
    s = r.get("settings") or {}
    if not s:
        return "-"
    return (f"{s['precision']}, compile {s['compile']}, matmul {s['float32_matmul_precision']}, "
            f"cuDNN TF32 {s['cudnn_allow_tf32']}, benchmark {s['cudnn_benchmark']}")


def _targets(targets: dict) -> list[str]:
    return [f"## Loss kernels compiled by this machine's triton {targets['triton']}", "",
            *md_table(["sm", "precision", "kernel", "tiles (m x n, warps, stages)", "shared B",
                       "registers", "spill stores / loads B"],
                      [[r["cc"], r["precision"], r["kernel"],
                        "{block_m} x {block_n}, {num_warps}, {num_stages}".format(**r["config"]),
                        r["shared"], r["registers"], f"{r['spill_stores']} / {r['spill_loads']}"]
                       for r in targets["kernels"]])]


def _loss(loss: dict) -> list[str]:
    impls = list(dict.fromkeys(r["impl"] for r in loss["results"]))
    done = "" if loss.get("complete", True) else " (cut short: the rows measured)"
    lines = [f"## Loss ({loss['meta']['device']}, d = 128){done}", "",
             markdown_table(loss["results"], impls)]
    if kernels := loss["meta"].get("triton_kernels"):
        lines += ["", "Loaded kernels:", "",
                  *md_table(["kernel", "inputs", "warps", "stages", "shared B", "registers",
                             "spills"],
                            [[k["kernel"], k["inputs"], k["num_warps"], k["num_stages"],
                              k["shared"], k["n_regs"], k["n_spills"]] for k in kernels])]
    return lines


def _train(train: dict) -> list[str]:
    c = train["config"]
    done = "" if train.get("complete", True) else " (cut short: the variants finished)"
    return [f"## Training ({train['device']}, {c['depth']} width {c['width']}, "
            f"{c['image_size']}x{c['image_size']}x{c['channels']}, batch "
            f"{c['batch_size']} ID + {c['batch_size']} OE){done}", "",
            *md_table(["pipeline", "images/s", "vs reference", "settings"],
                      [[name, f"{r['images_per_s']:.1f}" if r["images_per_s"] else
                        f"failed: {r.get('error')}", _times(r), _settings(r)]
                       for name, r in train["results"].items()])]


def _score(score: dict) -> list[str]:
    ceiling = score["ceiling_images_per_s"]
    return [f"## Scoring ({score['device']}; onnxruntime on {score['cpu']}; "
            f"ceiling {f'{ceiling:,.0f} images/s' if ceiling else 'n/a'})", "",
            score_table(score["results"])]


# The steps whose file gets a section, in the summary's order: its JSON under the step's name
# in gpu-check.json, its tables from the function.
SECTIONS = {"targets": _targets, "loss": _loss, "train": _train, "score": _score}


def summarize(work: Path, out: Path) -> tuple[str, dict[str, Any], bool]:
    preflight, steps = this_run(out / "gpu-check.jsonl")
    data: dict[str, Any] = {"environment": preflight, "steps": steps}
    lines = ["# GPU check", ""]
    if preflight:
        env = {k: v for k, v in preflight.items() if k not in ("kind", "missing")}
        lines += [", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += md_table(["step", "exit code", "seconds", "limit s", "timed out"],
                      [[s["step"], s["rc"], s["seconds"], s.get("limit_s", "-"),
                        s.get("timed_out", False)] for s in steps])
    ok = bool(preflight and preflight.get("ok")) and all(s["rc"] == 0 for s in steps)
    for s in steps:
        ok &= any(work.glob(STEP_FILES[s["step"]]))

    for step, section in SECTIONS.items():
        if found := _load(work, STEP_FILES[step]):
            data[step] = found
            lines += ["", *section(found)]
    data["ok"] = ok
    return "\n".join(lines) + "\n", data, ok


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: gpu_check_summary.py WORK_DIR OUT_DIR", file=sys.stderr)
        return 2
    work, out = Path(argv[0]), Path(argv[1])
    text, data, ok = summarize(work, out)
    write_text(out / "gpu-check.md", text)
    write_json(out / "gpu-check.json", data)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
