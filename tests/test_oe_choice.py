"""benchmarks/oe_choice.py picks each class's OE on validation alone and reports the chosen
runs' served test metrics."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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


def test_bad_variant_argument_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "oe_choice.py"),
                           "--val", "nofile", "--test", "a=x.json", "--out",
                           str(tmp_path / "o.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "expected NAME=FILE" in proc.stderr
    assert not (tmp_path / "o.json").exists()
