"""``torchrun --nproc-per-node 2 -m qembed train ... --sharding <type>``: the CTR experiment
with its low-precision tables (one per field) sharded by DMP, the dense layers
data-parallel; skipped where TorchRec is not installed."""
import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("torchrec")

from qembed.experiments.cli import main  # noqa: E402
from qembed.formats import row_bytes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELD_ROWS = sum((2000, 1000, 500, 200, 100, 50, 20, 10))  # synthetic()'s default fields


def torchrun(tmp_path, processes, *args, timeout=600):
    """Runs `qembed train` under torchrun on 127.0.0.1; returns its result rows."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={processes}", "-m", "qembed", "train", *args,
           "--quiet", "--out", str(tmp_path), "--name", f"run{processes}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    with open(tmp_path / f"run{processes}.csv") as f:
        return list(csv.DictReader(f))


def test_sharded_train_command(tmp_path):
    rows = torchrun(tmp_path, 2, "--rows", "3000", "--epochs", "1", "--methods", "alpt",
                    "lpt-sr", "--bits", "4", "--sharding", "row_wise")
    assert [(r["method"], r["bits"]) for r in rows] == [("alpt", "4"), ("lpt-sr", "4")]
    for r in rows:
        assert 0.0 <= float(r["auc"]) <= 1.0 and float(r["logloss"]) > 0
        # each process holds half of every table's rows (an odd table's extra row aside)
        assert abs(int(r["table_bytes"]) - FIELD_ROWS * row_bytes(16, 4, "symmetric") / 2) \
            <= 8 * row_bytes(16, 4, "symmetric")


def test_sharding_takes_low_precision_methods_only():
    with pytest.raises(ValueError, match="sharded runs train low-precision tables"):
        main(["--rows", "100", "--methods", "fp32", "--sharding", "row_wise", "--quiet"])


@pytest.mark.slow
def test_sharded_auc_matches_one_process(tmp_path):
    """2 processes, tables row-wise: the test AUC of the 1-process run within seed noise."""
    args = ["--rows", "20000", "--epochs", "2", "--methods", "alpt", "--bits", "8"]
    sharded = torchrun(tmp_path, 2, *args, "--sharding", "row_wise")
    assert main(args + ["--quiet", "--out", str(tmp_path), "--name", "one"]) == 0
    with open(tmp_path / "one.csv") as f:
        one = list(csv.DictReader(f))
    auc, auc_one = float(sharded[0]["auc"]), float(one[0]["auc"])
    assert auc > 0.58 and abs(auc - auc_one) < 0.01, (auc, auc_one)
