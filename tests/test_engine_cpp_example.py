"""The libtorch example examples/cpp/classify.cpp (built by CMakeLists.txt, e.g. through
scripts/check_cpp.sh) classifies token-id rows of a saved model directory with the C++ engine and
must print what the Python InferenceEngine computes. COSTEFF_CPP_BUILD_DIR points at the CMake
build (default build/cmake); under CI a missing binary fails instead of skipping."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import costeff
from costeff.inference import InferenceEngine
from test_engine import make_model

ROOT = Path(__file__).resolve().parent.parent
BINARY = Path(os.environ.get("COSTEFF_CPP_BUILD_DIR", ROOT / "build" / "cmake")) / "costeff_classify"
pytestmark = pytest.mark.skipif(not costeff.info()["cpu_kernels"], reason="costeff._C not built")


@pytest.fixture(scope="module")
def binary():
    if not BINARY.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{BINARY} was not built (scripts/check_cpp.sh builds it)")
        pytest.skip(f"{BINARY} not built: run scripts/check_cpp.sh")
    return BINARY


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_cpp_example_matches_python_engine(binary, tmp_path, precision):
    model = make_model(exit_pooling="mean")
    model.save_pretrained(tmp_path / "m")
    rows = [[5, 17, 3, 88, 9], [1, 2], [40, 41, 42, 43, 44, 45, 46, 47], [96]]
    res = subprocess.run([str(binary), str(tmp_path / "m"), "--precision", precision, "--threshold", "0.6",
                          *[",".join(map(str, r)) for r in rows]], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    printed = [json.loads(line) for line in res.stdout.splitlines()]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    ref = InferenceEngine.from_pretrained(tmp_path / "m", precision)(ids, mask, threshold=0.6)
    assert [p["exit_layer"] for p in printed] == ref.exit_layer.tolist()
    assert [p["label"] for p in printed] == ref.logits.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor([p["logits"] for p in printed]), ref.logits, atol=1e-5, rtol=1e-5)


def test_cpp_example_errors(binary, tmp_path):
    res = subprocess.run([str(binary), str(tmp_path), "1,2,3"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "config.json not found" in res.stderr
    res = subprocess.run([str(binary), str(tmp_path), "1,x"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not a row of token ids" in res.stderr
