import os

import torch

# Triton kernels are proven on CPU through the interpreter; the flag is read when kernel modules are
# imported, so it is set before any test module loads them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))
