import os

import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. The flag must be set
# before a kernel module is imported (``triton.jit`` reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
