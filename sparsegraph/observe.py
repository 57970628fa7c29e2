"""`Observer`: runs a traced graph on calibration batches so analysis passes can watch its values.

Subclasses override ``run_node`` (call ``super().run_node(n)`` and look at the result, or at
``self.env`` for a node's inputs). `run_batch` feeds one batch the way the graph's placeholders
expect it and, when the model takes an ``attention_mask`` ([batch, tokens], 1 = real token), keeps it
as ``self.token_mask`` so that statistics can leave padding tokens out.
"""

from __future__ import annotations

import torch
import torch.fx

from sparsegraph import ir


class Observer(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.token_mask: torch.Tensor | None = None

    def run_batch(self, args: tuple, kwargs: dict) -> None:
        flat = ir.flatten_inputs(self.module, args, kwargs)
        placeholders = [n for n in self.module.graph.nodes if n.op == "placeholder"]
        self.token_mask = next((x.bool() for p, x in zip(placeholders, flat)
                                if "attention_mask" in p.name and isinstance(x, torch.Tensor) and x.dim() == 2),
                               None)
        with torch.no_grad():
            self.run(*flat)
