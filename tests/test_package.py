import subprocess
import sys

import torch

import costeff


def test_info_reports_the_build():
    info = costeff.info()
    assert info["cpu_kernels"] is True
    assert info["torch"] == torch.__version__
    assert set(info["ops"]) == {"exit_head", "slim_attention", "slim_ffn", "add_layer_norm"}
    assert info["cuda_kernels"] in (True, False)


def test_every_op_has_a_cpu_kernel_and_a_fake():
    for name in costeff.ops.OP_NAMES:
        qualname = f"costeff::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"), name


def test_missing_extension_gives_clear_error_not_traceback_on_import():
    code = (
        "import sys\n"
        "sys.modules['costeff._C'] = None  # simulate an unbuilt extension\n"
        "import torch, costeff\n"
        "assert costeff.info()['cpu_kernels'] is False\n"
        "try:\n"
        "    costeff.ops.exit_head(torch.zeros(1, 4), torch.zeros(2, 4), torch.zeros(2), 0.5)\n"
        "except costeff.ExtensionNotBuiltError as e:\n"
        "    print('MSG', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install --no-build-isolation -e ." in out.stdout
