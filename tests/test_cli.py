"""The command line's train experiment end to end on a small synthetic set."""
import csv
import math

import torch

from qembed.experiments import data
from qembed.experiments.cli import main
from qembed.formats import row_bytes


def test_train_command_writes_results(tmp_path, capsys):
    torch.manual_seed(0)
    rc = main(["--rows", "8000", "--epochs", "2", "--lr", "0.01", "--batch-size", "256",
               "--methods", "fp32", "ptq", "alpt", "--bits", "8", "4", "--quiet", "--out",
               str(tmp_path), "--name", "t"])
    assert rc == 0
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["bits"]) for r in rows] == [
        ("fp32", "32"), ("ptq", "8"), ("ptq", "4"), ("alpt", "8"), ("alpt", "4")]
    num_rows = sum((2000, 1000, 500, 200, 100, 50, 20, 10))  # synthetic()'s default fields
    fp32 = num_rows * 16 * 4
    for r in rows:
        fmt = {"ptq": "affine", "alpt": "symmetric"}.get(r["method"])
        expect = fp32 if fmt is None else num_rows * row_bytes(16, int(r["bits"]), fmt)
        assert int(r["table_bytes"]) == expect
        assert abs(float(r["compression"]) - fp32 / expect) < 1e-9
    # the values: trained models beat a constant prediction of the test set's click rate,
    # and quantizing the trained fp32 model after training changes its ranking but little
    test = data.synthetic(num_samples=8000).split(seed=0)[2]
    rate = float(test.y.mean())
    constant = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    auc = {(r["method"], int(r["bits"])): float(r["auc"]) for r in rows}
    logloss = {(r["method"], int(r["bits"])): float(r["logloss"]) for r in rows}
    assert auc["fp32", 32] > 0.6 and logloss["fp32", 32] < constant
    assert abs(auc["ptq", 8] - auc["fp32", 32]) < 0.002
    assert abs(auc["ptq", 4] - auc["fp32", 32]) < 0.01
    assert auc["alpt", 8] > 0.6 and logloss["alpt", 8] < constant
    assert (tmp_path / "t.png").stat().st_size > 0
    assert "| alpt | 4 |" in (tmp_path / "t.md").read_text()
    assert "| ptq | 4 |" in capsys.readouterr().out


def test_claims_compare_methods_on_the_same_split():
    from qembed.experiments.runner import claims, summarize

    rows = []
    for seed, base in enumerate([0.90, 0.95]):  # split-to-split spread larger than the effects
        for method, bits, delta in [("fp32", 32, 0.0), ("alpt", 8, -0.002), ("lpt-dr", 2, -0.03),
                                    ("lpt-sr", 2, -0.02), ("alpt", 2, -0.025)]:
            rows.append({"method": method, "bits": bits, "seed": seed, "auc": base + delta,
                         "logloss": 0.5, "table_bytes": 1, "compression": 1.0, "train_s": 1.0})
    found = {c["claim"]: c for c in claims(summarize(rows))}
    assert found["8-bit ALPT within 0.001 AUC of fp32"]["holds here"] == "no"
    sr_dr = found["2-bit: LPT with stochastic rounding beats deterministic rounding"]
    assert sr_dr["holds here"] == "yes" and sr_dr["AUC difference (mean over seeds)"] == "+0.0100"
    assert found["2-bit: ALPT (learned step) beats LPT-SR (fixed step)"]["holds here"] == "no"
    assert not any(c.startswith("4-bit") for c in found)  # no 4-bit runs: nothing claimed
