"""scripts/gpu_check.sh --dry-run: every step of the one prepared GPU check (probe, build, tests,
benchmark, training on the device) run with the CPU's stand-ins, so the device call is ready."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, COSTEFF_GPU_CARRY=str(tmp_path / "carry"), COSTEFF_GPU_NO_BACKBONE="1", OUT=str(tmp_path / "out"))
    carry = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_carry.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert carry.returncode == 0, carry.stdout[-2000:] + carry.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "carry" / "whl"))[0].startswith("datasets-")
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"], env=env, capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert res.returncode == 0, summary + res.stdout[-2000:] + res.stderr[-2000:]
    steps = [line.split(":")[0] for line in summary.splitlines() if ": ok (" in line]
    assert steps == ["probe", "build", "tests", "tests-cpu", "op-errors", "engine-config", "tiny-backbone", "train-tiny-fp32", "train-tiny-bf16", "bench"], summary
    assert "FAILED" not in summary and "TIMEOUT" not in summary
    assert {"env.txt", "build.log", "tests.log", "bench.log", "bench_gpu.json", "train.log", "summary.txt"} <= set(os.listdir(tmp_path / "out"))
    assert "student GpuRunner bf16" in (tmp_path / "out" / "bench.log").read_text()
    log = (tmp_path / "out" / "tests.log").read_text()
    assert "exit_head" in log and "a bad config is a ValueError" in log  # the op error table, the config reader probe
    # a recheck of named steps only
    env["OUT"] = str(tmp_path / "out2")
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"], env=dict(env, COSTEFF_GPU_STEPS="probe op-errors"),
                         capture_output=True, text=True, timeout=300)
    summary = (tmp_path / "out2" / "summary.txt").read_text()
    assert res.returncode == 0 and [line.split(":")[0] for line in summary.splitlines() if ": ok (" in line] == ["probe", "op-errors"], summary
