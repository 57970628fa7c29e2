"""``python -m bench SUITE [options]``: run one benchmark suite (``python -m bench SUITE -h`` for its
options).

Suites: ``foundation`` (dense eager vs torch.compile vs onnxruntime), ``activation`` (MiniLM activation
sparsity: fidelity curves and static-pruning speed), ``decode`` (token-by-token generation of a
TinyLlama-shaped model: HF generate vs our dense and sparse decode), ``lm_quality`` (perplexity and
token agreement of TEAL sparsity on the trained ``stdlib_lm``),
``attention`` (block-sparse attention vs dense SDPA and FlexAttention), ``tokens`` (token pruning
fidelity on MiniLM, ViT-B/16 speed, digits_vit accuracy and RoIs), ``gemv`` (one-token input-sparse
GEMV: the compiled kernel vs dense, torch.sparse.mm and embedding_bag), ``fidelity`` (the quality
budget on MiniLM and digits_vit: held-out fidelity and speed with and without a floor), ``recover``
(MiniLM neuron removal and 2:4 MLPs, one-shot vs after `sparsegraph.recover`), ``conv`` (sparse 1x1
convolutions on EfficientNet-Lite0: per-layer and whole-model speed, fidelity on photo crops), ``dit`` (one
denoising step of a video DiT at 8k-32k tokens: dense vs 3-D window attention vs FlexAttention),
``dit_quality`` (head patterns of the trained ``moving_digits_dit``, their stability over timesteps, and
sparse sampling's fidelity to dense at three recalls).
"""

import importlib
import sys

SUITES = ("foundation", "activation", "decode", "lm_quality", "attention", "tokens", "gemv", "fidelity",
          "recover", "conv", "dit", "dit_quality")

if len(sys.argv) < 2 or sys.argv[1] not in SUITES:
    print(__doc__)
    sys.exit(2)
sys.exit(importlib.import_module(f"bench.{sys.argv[1]}").main(sys.argv[2:]))
