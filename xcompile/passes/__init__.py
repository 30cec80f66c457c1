"""Compiler passes, one module each, registered by name with `@register_pass`.

`DEFAULT_PLAN` is the one place that lists the default pipeline, in order.
"""

DEFAULT_PLAN: list[str] = ["pin-embodiment", "rl-finetune", "distill", "export-onnx", "quantize",
                           "build-tensorrt"]
