"""sparsegraph: a graph compiler that makes PyTorch models sparse and fast.

    import sparsegraph as sg
    cm = sg.compile(model, config, example_inputs=(x,), calibration=batches)
    y = cm(x); cm.plan.save("plan.json"); cm.export_onnx("model.onnx")

See docs/ARCHITECTURE.md for the flow of one compile.
"""

__version__ = "0.1.0"
