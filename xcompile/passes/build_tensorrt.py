"""build-tensorrt: a TensorRT engine (.plan) from the ONNX policy, for the GPU it runs on.

onnx -> tensorrt. Cost: tens of seconds to minutes of kernel timing on the GPU; a timing cache
kept beside the build folder makes later builds on the same GPU and TensorRT fast.

Method: a strongly typed network (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`): the precision is
the one the ONNX states (fp32, fp16 weights, or int8 through explicit QDQ), TensorRT does not pick
precisions itself, so what was checked on the CPU is what runs. `OnnxParser`, one optimization
profile for the batch (1 / 1 / `max_batch`) when the graph's batch is dynamic, the serialized engine
in `policy.plan` and the versions it depends on (TensorRT, GPU name, compute capability) in
`policy.plan.json`: a .plan only runs with the TensorRT and GPU that built it.

Where `tensorrt` cannot be imported or there is no CUDA device, or the policy is recurrent (not
built yet: its state inputs need profiles of their own), `run` raises `ToolUnavailable` in one
line; the pass manager skips the pass or fails the build, as the user asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from xcompile.artifact import Artifact
from xcompile.errors import PassCheckError, ToolUnavailable
from xcompile.frontends.graph import is_recurrent
from xcompile.passes.base import BuildContext, Pass, PassConfig, PassResult, register_pass


class TensorRTConfig(PassConfig):
    workspace_mb: int = Field(1024, ge=16, description="builder workspace memory limit, MiB")
    max_batch: int = Field(64, ge=1, description="largest batch the engine accepts (dynamic "
                           "batch graphs only)")
    optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimization "
                                    "level (higher: longer build, maybe faster engine)")
    timing_cache_dir: str = Field("", description="folder of the timing cache file; empty: "
                                  "'tensorrt-timing-cache' beside this pass's work folder")


def import_tensorrt() -> Any:
    """`tensorrt` and a CUDA device, or `ToolUnavailable` saying which is missing."""
    try:
        import tensorrt as trt  # optional and heavy: only on a machine that builds engines
    except ImportError as e:
        raise ToolUnavailable(
            "build-tensorrt: TensorRT is not installed (pip install 'xcompile[tensorrt]' on a "
            f"machine with an NVIDIA GPU); {e}") from None
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as e:  # noqa: BLE001 - TensorRT raises plain errors without CUDA
        raise ToolUnavailable(f"build-tensorrt: TensorRT {trt.__version__} found no usable "
                              f"CUDA device ({e})") from None
    if builder is None:
        raise ToolUnavailable(f"build-tensorrt: TensorRT {trt.__version__} found no usable "
                              "CUDA device")
    return trt


def _gpu() -> tuple[str, str]:
    try:
        import torch  # heavy: only when an engine is built

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except ImportError:
        pass
    return "unknown", "unknown"


@register_pass
class BuildTensorRT(Pass):
    name = "build-tensorrt"
    version = 1
    input_format = "onnx"
    output_format = "tensorrt"
    Config = TensorRTConfig
    summary = "strongly typed TensorRT engine (needs TensorRT and a CUDA GPU)"

    def run(self, art: Artifact, cfg: PassConfig, ctx: BuildContext) -> PassResult:
        assert isinstance(cfg, TensorRTConfig)
        if is_recurrent(art):       # skipped like a missing TensorRT: the default plan goes on
            raise ToolUnavailable("build-tensorrt does not take a recurrent policy yet (its state "
                                  "inputs need optimization profiles of their own); skipped")
        trt = import_tensorrt()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(art.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise PassCheckError(f"build-tensorrt: TensorRT cannot parse {art.path.name}: "
                                 f"{errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
        config.builder_optimization_level = cfg.optimization_level

        inp = network.get_input(0)
        if inp.shape[0] == -1:
            feat = tuple(inp.shape)[1:]
            profile = builder.create_optimization_profile()
            profile.set_shape(inp.name, (1, *feat), (1, *feat), (cfg.max_batch, *feat))
            config.add_optimization_profile(profile)

        gpu, cc = _gpu()
        cache_dir = (Path(cfg.timing_cache_dir) if cfg.timing_cache_dir
                     else ctx.workdir.parent / "tensorrt-timing-cache")
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = cache_dir / f"trt{trt.__version__}-sm{cc}.cache"
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists()
                                           else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise PassCheckError(f"build-tensorrt: TensorRT could not build an engine from "
                                 f"{art.path.name} (see its log above)")
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))

        plan_path = ctx.workdir / "policy.plan"
        plan_path.write_bytes(bytes(plan))
        info = {"tensorrt_version": trt.__version__, "gpu": gpu, "compute_capability": cc,
                "onnx_sha256": art.sha256, "strongly_typed": True,
                "max_batch": cfg.max_batch if inp.shape[0] == -1 else int(inp.shape[0])}
        (ctx.workdir / "policy.plan.json").write_text(json.dumps(info, indent=2) + "\n")
        out = Artifact.create("tensorrt", plan_path, ctx.robot.name,
                              meta={**info, "onnx_path": str(art.path),
                                    "precision": art.meta.get("precision", "fp32")},
                              lineage=(*art.lineage, self.name))
        return PassResult(out, info, files=("policy.plan.json",))

    def check(self, inp: Artifact, result: PassResult, cfg: PassConfig,
              ctx: BuildContext) -> dict[str, Any]:
        out = result.artifact
        trt = import_tensorrt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(out.path.read_bytes())
        if engine is None:
            raise PassCheckError("build-tensorrt: the engine just built does not deserialize")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != ["action", "obs"]:
            raise PassCheckError(f"build-tensorrt: engine I/O is {names}, expected obs/action")
        return {"plan_bytes": out.n_bytes, "tensorrt_version": out.meta["tensorrt_version"],
                "gpu": out.meta["gpu"], "compute_capability": out.meta["compute_capability"]}
