"""benchmarks/oe_choice.py picks each class's OE on validation alone and reports the chosen
runs' served test metrics."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, import_benchmark

METRICS = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR@95TPR", "TPR", "FPR")


def _val(path: Path, aurocs: dict[str, float]) -> str:
    doc = {"protocol": "one-vs-rest", "eval_split": "val", "device": "cpu", "per_class": {
        c: {"oecl-photos": {"auroc": {"mean-view-norm": a}}, "nn": {"auroc": 0.5}}
        for c, a in aurocs.items()}}
    path.write_text(json.dumps(doc))
    return str(path)


def _test(path: Path, aurocs: dict[str, float]) -> str:
    served = {c: {p: dict.fromkeys(METRICS, a) for p in ("fp32", "int8")}
              for c, a in aurocs.items()}
    doc = {"protocol": "one-vs-rest", "eval_split": "test", "device": "cpu",
           "served": {"per_class": served},
           "per_class": {c: {"nn": {"auroc": 0.9}, "pca": {"auroc": 0.8}} for c in aurocs}}
    path.write_text(json.dumps(doc))
    return str(path)


def test_choice_follows_validation_not_test(tmp_path: Path) -> None:
    # Validation prefers "a" for class 1 and "b" for class 2; the test set says the opposite
    # for class 2, and the choice must not look at it.
    args = ["--val", "a=" + _val(tmp_path / "va.json", {"1": 0.9, "2": 0.6}),
            "--val", "b=" + _val(tmp_path / "vb.json", {"1": 0.7, "2": 0.8}),
            "--test", "a=" + _test(tmp_path / "ta.json", {"1": 0.95, "2": 0.99}),
            "--test", "b=" + _test(tmp_path / "tb.json", {"1": 0.5, "2": 0.85}),
            "--out", str(tmp_path / "out.json")]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "oe_choice.py"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    per_class = out["served"]["per_class"]
    assert per_class["1"]["chosen"] == "a" and per_class["2"]["chosen"] == "b"
    assert per_class["2"]["other_test_auroc"] == {"a": 0.99}
    assert abs(out["served"]["mean"]["fp32"]["AUROC"] - (0.95 + 0.85) / 2) < 1e-12
    assert out["baselines_mean"] == {"nn": 0.9, "pca": 0.8}
    assert "| **mean** |" in proc.stdout


def test_one_variant_without_validation_files_is_reported_over_all_its_files(
        tmp_path: Path) -> None:
    # Two class subsets of one variant, run side by side: one record, one mean.
    t1 = _test(tmp_path / "t1.json", {"1": 0.9, "3": 0.7})
    t2 = _test(tmp_path / "t2.json", {"2": 0.8, "4": 0.6})
    doc = json.loads(Path(t2).read_text())  # class 4's int8 file failed verification
    doc["served"]["per_class"]["4"]["int8"] = {"error": "verification failed for int8"}
    choice = {"judged_on": "other-classes", "chosen": "far+jigsaw", "val_auroc": {}}
    doc["per_class"]["2"]["oecl-photos"] = {"oe_auto": choice}  # trained with --oe auto
    Path(t2).write_text(json.dumps(doc))
    proc = _run("--test", f"mix={t1},{t2}", "--out", str(tmp_path / "out.json"))
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((tmp_path / "out.json").read_text())
    assert rec["rule"].startswith("one variant for every class")
    assert list(rec["served"]["per_class"]) == ["1", "2", "3", "4"]
    assert {r["chosen"] for r in rec["served"]["per_class"].values()} == {"mix"}
    assert rec["served"]["per_class"]["2"]["oe_auto"] == choice
    assert "oe_auto" not in rec["served"]["per_class"]["1"]
    assert rec["served"]["mean"]["fp32"]["AUROC"] == pytest.approx(0.75)
    assert "classes" not in rec["served"]["mean"]["fp32"]
    assert rec["served"]["mean"]["int8"]["AUROC"] == pytest.approx(0.8)  # classes 1-3 only
    assert rec["served"]["mean"]["int8"]["failed_classes"] == ["4"]
    assert "failed verification" in proc.stdout and "(3 classes)" in proc.stdout
    # A class trained with --oe auto counts its training time, which holds all its probes.
    oe_choice = import_benchmark("oe_choice")
    auto = {"oecl-photos": {"oe_auto": choice, "run": "reused", "budget": {
        "train_wall_s": 90.0, "run_wall_s": 40.0, "eval_wall_s": 1.0}}}
    assert oe_choice.budget({}, {"mix": {"2": auto}}, {"2": {"chosen": "mix"}})[
        "train_core_s"] == 90.0
    # Two variants and nothing to choose between them by is an error, before any output.
    proc = _run("--test", f"a={t1}", "--test", f"b={t2}", "--out", str(tmp_path / "o2.json"))
    assert proc.returncode != 0 and "nothing to choose by" in proc.stderr
    assert not (tmp_path / "o2.json").exists()


def test_bad_variant_argument_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "oe_choice.py"),
                           "--val", "nofile", "--test", "a=x.json", "--out",
                           str(tmp_path / "o.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "expected NAME=FILE" in proc.stderr
    assert not (tmp_path / "o.json").exists()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "oe_choice.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_test_files_need_only_the_chosen_variant_and_the_cost_adds_up(tmp_path: Path) -> None:
    """Probe-then-continue scores only the chosen variant on the test set; the budget counts
    every variant's probe and the chosen runs' extension."""
    va, vb = _val(tmp_path / "va.json", {"1": 0.9, "2": 0.6}), _val(tmp_path / "vb.json",
                                                                      {"1": 0.7, "2": 0.8})
    ta, tb = _test(tmp_path / "ta.json", {"1": 0.95}), _test(tmp_path / "tb.json", {"2": 0.85})
    # Class 1's test record also says how long its run trained in all (the probe, an earlier
    # extension and this one): that counts instead of probe + this extension.
    for path, train_s, whole in ((va, 10.0, None), (vb, 20.0, None), (ta, 100.0, 150.0),
                                 (tb, 200.0, None)):
        doc = json.loads(Path(path).read_text())
        for rec in doc["per_class"].values():
            rec["oecl-photos"] = {**rec.get("oecl-photos", {}), "run": "extended", "budget": {
                "train_wall_s": train_s, "eval_wall_s": 1.0, "run_wall_s": whole}}
        Path(path).write_text(json.dumps(doc))
    out = tmp_path / "out.json"
    proc = _run("--val", f"a={va}", "--val", f"b={vb}", "--test", f"a={ta}", "--test",
                f"b={tb}", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(out.read_text())
    assert {c: r["chosen"] for c, r in rec["served"]["per_class"].items()} == {"1": "a", "2": "b"}
    assert rec["served"]["per_class"]["1"]["other_test_auroc"] == {}
    # Probes: both variants of both classes (2 x 10 + 2 x 20); extensions: 100 + 200. In all:
    # class 1 = b's probe + a's whole run (20 + 150), class 2 = both probes + b's extension.
    assert rec["budget"]["probe_train_s"] == 60.0 and rec["budget"]["test_train_s"] == 300.0
    assert rec["budget"]["train_core_s"] == 400.0 and rec["budget"]["core_s"] == 406.0
    assert rec["budget"]["test_runs_extended_probes"] is True
    # A class whose chosen variant has no test result is an error, not a silent gap.
    proc = _run("--val", f"a={va}", "--val", f"b={vb}", "--test", f"a={ta}", "--out",
                str(tmp_path / "gap.json"))
    assert proc.returncode != 0 and "class 2: no served test result for b" in proc.stderr
    assert not (tmp_path / "gap.json").exists()


def test_probe_mode_refuses_bad_arguments_before_training(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for args, msg in (
        (["--probe-steps", "600", "--steps", "600"], "--probe-steps needs --steps larger"),
        (["--probe-steps", "6", "--steps", "9", "--variant", "a=0"], "at least two variants"),
        (["--probe-steps", "6", "--steps", "9", "--variant", "a=2", "--variant", "b=0"],
         "expected NAME=OVERLAY[,JIGSAW[,CUTPASTE]]"),
        (["--probe-steps", "6", "--steps", "9", "--variant", "a=0.5,0.5", "--variant", "b=0"],
         "leave some photos"),
        (["--probe-steps", "6", "--steps", "9", "--val", "a=x.json"], "--val/--test read files"),
        ([], "give --val and --test files, or --probe-steps"),
    ):
        proc = _run(*args, "--runs-dir", str(runs), "--out", str(tmp_path / "o.json"))
        assert proc.returncode != 0 and msg in proc.stderr, (args, proc.stderr)
    assert not runs.exists() and not (tmp_path / "o.json").exists()


def test_variants_name_their_self_made_oe_shares() -> None:
    oe_choice = import_benchmark("oe_choice")
    assert oe_choice._parse_variants(["photos=0", "mix=0.25,0.25", "cp=0,0,0.5"]) == {
        "photos": {"oe_overlay": 0.0, "oe_jigsaw": 0.0, "oe_cutpaste": 0.0},
        "mix": {"oe_overlay": 0.25, "oe_jigsaw": 0.25, "oe_cutpaste": 0.0},
        "cp": {"oe_overlay": 0.0, "oe_jigsaw": 0.0, "oe_cutpaste": 0.5},
    }
    with pytest.raises(SystemExit, match="leave some photos"):
        oe_choice._parse_variants(["a=0.25,0.25,0.5", "b=0"])


def test_a_failed_job_names_its_log_and_an_existing_result_is_reused(tmp_path: Path) -> None:
    oe_choice = import_benchmark("oe_choice")
    out, log_path = tmp_path / "val" / "a.json", tmp_path / "logs" / "a.log"
    with pytest.raises(SystemExit, match=r"job failed .*a\.log.*: error: --steps"):
        oe_choice._job(["--steps", "oecl-photos=0"], out, log_path)
    assert not out.exists() and "error: --steps" in log_path.read_text()
    out.parent.mkdir()
    out.write_text("{}")
    assert oe_choice._job(["--steps", "oecl-photos=0"], out, log_path) == out  # not run again
