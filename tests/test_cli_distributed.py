"""`curvscope analyze` under torchrun: every rank computes on its shard, rank 0 alone writes,
and the numbers equal the single-process run's."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ARGS = [
    "analyze", "--model", "user_model:build_model", "--data", "user_model:build_data",
    "--dtype", "float64", "--top-k", "2", "--bottom-k", "1", "--trace-matvecs", "26",
    "--no-density", "--no-landscape", "--quiet", "--json",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


def test_torchrun_two_ranks_match_one_process_and_only_rank_0_writes(tmp_path):
    single = _run([sys.executable, "-m", "curvscope.cli", *ARGS, "--out", "one"], tmp_path)
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "curvscope.cli", *ARGS, "--out", "two",
    ]  # fmt: skip
    double = _run(torchrun, tmp_path)
    one = json.loads(single.stdout)
    two = json.loads(double.stdout)  # only rank 0 prints the JSON
    assert one["num_examples"] == two["num_examples"] == 30
    for key in ("loss", "gradient_norm"):
        assert abs(one[key] - two[key]) <= 1e-10 * max(1.0, abs(one[key]))
    for a, b in zip(one["top"]["values"], two["top"]["values"], strict=True):
        assert abs(a - b) <= 1e-8 * max(1.0, abs(a))
    assert abs(one["trace"]["value"] - two["trace"]["value"]) <= 1e-8
    assert (tmp_path / "two" / "index.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
