"""Front ends for foreign fat policies: an ONNX model or a torch.export program plus an interface
description (`interface.py`) that says how to drive it for each body.

`graph`: reading the model (never running code from it) into one ONNX graph and checking it against
the interface and the target; `pin`: binding a body's embodiment inputs and folding them away with
onnxscript's optimizer; `measure`: the report's row for a foreign fat graph.
"""

FAT_GRAPH = "fat-graph"            # the artifact format of a foreign fat policy (xcompile.artifact)
FOREIGN_SUFFIXES = (".onnx", ".pt2")
