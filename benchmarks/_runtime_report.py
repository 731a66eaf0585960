"""bench_runtime's goals, how its record meets them, and its markdown (RESULTS.md is built from
it)."""

from __future__ import annotations

from typing import Any

from _ceiling import ceiling_markdown
from _harness import md_table

# The goals this benchmark checks; a ratio is images/s over torch eager fp32's images/s.
TARGETS = {
    "onnxruntime_fp32_vs_torch": 1.5,
    "onnxruntime_int8_vs_torch": 2.5,
    "int8_auroc_diff": 0.005,
    "http_vs_in_process": 0.70,
}


def _fmt_ms(lat: dict[str, float], key: str) -> str:
    return f"{lat[key]:.1f}"


def markdown(rep: dict[str, Any]) -> str:
    ip, http = rep["in_process"]["summary"], rep["http"]
    files = {label: f for label, f in rep["in_process"]["files"].items()}
    n, batch = rep["settings"]["rounds"], rep["settings"]["batch"]
    rows = []
    for label, s in ip.items():
        lat = s["latency_ms_median_round"]
        rows.append([f"{label}, batch {batch}", files[label], f"{s['images_per_s_median']:.1f}",
                     " / ".join(f"{x:.1f}" for x in s["images_per_s_rounds"]),
                     _fmt_ms(lat, "p50"), _fmt_ms(lat, "p99"), f"{s['vs_torch_median']:.2f}x"])
    r = http["result"]
    torch_ips = ip["torch eager fp32"]["images_per_s_median"]
    rows.append([f"HTTP `oecl serve` ({http['server_runtime'].get('name')} "
                 f"{http['server_runtime'].get('precision')}), 1 image/request, concurrency "
                 f"{http['concurrency']}", http["served_file"], f"{r['images_per_s']:.1f}",
                 f"{r['ok']}/{r['requests']} ok", _fmt_ms(r["latency_ms"], "p50"),
                 _fmt_ms(r["latency_ms"], "p99"), f"{r['images_per_s'] / torch_ips:.2f}x"])
    lines = [
        f"{rep['device']}; torch {rep['versions'].get('torch')}, onnxruntime "
        f"{rep['versions'].get('onnxruntime')}; {rep['threads']['used']} intra-op threads for "
        f"torch and onnxruntime; model {rep['model']['architecture_label']}, "
        f"{rep['model']['input']} uint8 in; server on uvicorn {rep['http_stack']['uvicorn']} "
        f"({rep['http_stack']['http']}, {rep['http_stack']['loop']}).",
        "",
        # latency: per run() call of a whole batch in process, per request over HTTP
        *md_table(["path", "file", f"images/s (median of {n})", "rounds", "p50 ms", "p99 ms",
                   "vs torch eager fp32"], rows, "llrlrrr"),
        "", *ceiling_markdown(rep["compute_ceiling"], batch),
    ]
    tr = rep["model"]["training"]
    if tr is not None:
        auroc = "-" if tr["test_AUROC"] is None else f"{tr['test_AUROC']:.4f}"
        lines += ["", f"Trained here: {tr['config']['steps']} steps of "
                  f"{tr['config']['batch_size']} ID + OE images in {tr['seconds']:.0f} s "
                  f"(test AUROC by norm, bf16: {auroc})."]
    ver = rep["export_verification"]
    if ver.get("available"):
        f32, i8 = ver["files"].get("model.onnx", {}), ver["files"].get("model.int8.onnx", {})
        lines += ["", f"Export verification ({ver['n_id']} ID + {ver['n_ood']} OOD held-out "
                  f"images): PyTorch fp32 AUROC {ver['reference']['AUROC']:.4f}; model.onnx max "
                  f"relative norm difference {f32.get('max_rel_diff', float('nan')):.1e}; "
                  f"model.int8.onnx AUROC {i8.get('AUROC', float('nan')):.4f} (difference "
                  f"{i8.get('AUROC_diff', float('nan')):.4f})"
                  + (f"; the exporter refused it: {ver['exporter_refused']}"
                     if ver["exporter_refused"] else "") + "."]
    b = http["batches"]
    dist = ", ".join(f"{d['sizes']}: {d['batches']}" for d in b["distribution"])
    cpu = http["cpu"]
    result = {True: "pass", False: "FAIL", None: "not measured"}
    lines += [
        "",
        f"Server batches over the timed requests: {b['batches']} batches, mean "
        f"{b['mean'] or 0:.1f} images ({dist}). In-process {http['served_label']} at batch "
        f"{http['in_process_at_formed_batch']['batch']}: "
        f"{http['in_process_at_formed_batch']['images_per_s']:.1f} images/s. CPU during the "
        f"timed requests: server {cpu['server_cores_busy'] or 0:.2f} cores, load client "
        f"{cpu['client_cores_busy'] or 0:.2f} cores, of {cpu['cores']} shared.",
        "",
        *md_table(["target", "measured", "goal", "result"],
                  ([t["name"], t["measured"], t["goal"], result[t["pass"]]]
                   for t in rep["targets"]), "lrrl"),
    ]
    return "\n".join(lines)


def _shutdown_text(s: dict[str, Any]) -> str:
    if not s["exited"]:
        return "did not exit"
    how = "graceful" if s["graceful"] else "no shutdown lines in its log"
    return f"exit status {s['exit_code']} after {s.get('seconds_to_exit', '-')} s, {how}"


def targets(rep: dict[str, Any]) -> list[dict[str, Any]]:
    ip, http, ver = rep["in_process"]["summary"], rep["http"], rep["export_verification"]
    fp32, int8 = ip["onnxruntime fp32"], ip["onnxruntime int8"]
    out = [
        {"name": "onnxruntime fp32 / torch eager fp32 (images/s, median rounds)",
         "measured": f"{fp32['vs_torch_median']:.2f}x",
         "goal": f">= {TARGETS['onnxruntime_fp32_vs_torch']}x",
         "pass": fp32["vs_torch_median"] >= TARGETS["onnxruntime_fp32_vs_torch"]},
        {"name": "onnxruntime int8 / torch eager fp32 (images/s, median rounds)",
         "measured": f"{int8['vs_torch_median']:.2f}x",
         "goal": f">= {TARGETS['onnxruntime_int8_vs_torch']}x",
         "pass": int8["vs_torch_median"] >= TARGETS["onnxruntime_int8_vs_torch"]},
    ]
    int8_file = ver.get("files", {}).get("model.int8.onnx") if ver.get("available") else None
    out.append({
        "name": "int8 AUROC vs PyTorch fp32 (export verification; absolute difference)",
        "measured": "-" if int8_file is None else
        f"{int8_file['AUROC']:.4f} vs {ver['reference']['AUROC']:.4f} "
        f"(diff {int8_file['AUROC_diff']:.4f})",
        "goal": f"<= {TARGETS['int8_auroc_diff']}",
        "pass": None if int8_file is None
        else int8_file["AUROC_diff"] <= TARGETS["int8_auroc_diff"],
    })
    ratio = http["vs_in_process_best_batch"]
    out += [
        {"name": f"HTTP images/s / in-process best batch-{rep['settings']['batch']} round, "
                 f"{http['served_label']}",
         "measured": f"{ratio:.2f}", "goal": f">= {TARGETS['http_vs_in_process']}",
         "pass": ratio >= TARGETS["http_vs_in_process"]},
        {"name": "HTTP failed requests (non-200 or unsent)",
         "measured": str(http["result"]["failures"]), "goal": "0",
         "pass": http["result"]["failures"] == 0},
        {"name": "server exits on SIGTERM (graceful: lifespan shutdown logged)",
         "measured": _shutdown_text(http["shutdown"]), "goal": "exits gracefully",
         "pass": bool(http["shutdown"]["graceful"])},
    ]
    return out
