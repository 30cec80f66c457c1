"""The layers a slim policy folds into (`xcompile.cgen.graph`) and the C emitter prints
(`xcompile.cgen.emit`), and the constants the folding works on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Const:
    arr: np.ndarray
    origin: str          # "fp16" for a float16 initializer cast to float, else "fp32"


@dataclass
class QConst:
    """DequantizeLinear(q, scale, zero_point, axis) of constants, not yet dequantized."""
    q: np.ndarray
    scale: np.ndarray
    zp: np.ndarray
    axis: int

    def value(self) -> np.ndarray:
        """As onnxruntime dequantizes: float(q - zp) * scale, in float32."""
        shape = [1] * self.q.ndim
        if self.scale.ndim == 1 and self.q.ndim:
            shape[self.axis] = -1
        s = self.scale.astype(np.float32).reshape(shape if self.scale.size > 1 else ())
        z = self.zp.astype(np.int64).reshape(shape if self.zp.size > 1 else ())
        return ((self.q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


@dataclass
class Dense:
    k: int
    n: int
    w: np.ndarray                 # [k][n]: float32, or int8/int16 holding q - zero_point
    weights: str                  # fp32 | fp16 | int8 | uint8 | int16 | uint16
    scale: np.ndarray | None      # float32: () per tensor, (n,) per output, (k,) per input
    scale_axis: str               # "" | "tensor" | "out" | "in"
    bias: np.ndarray | None       # float32 (n,)
    alpha: float = 1.0
    act: Act | None = None


@dataclass
class Act:
    fn: str
    width: int
    alpha: float = 0.0
    lo: float | None = None
    hi: float | None = None


@dataclass
class Arith:
    fn: str
    width: int
    const: np.ndarray             # float32, () or (width,)
    const_first: bool             # c - x, c / x, ...


@dataclass
class FakeQuant:
    """QuantizeLinear -> DequantizeLinear on an activation (per tensor)."""
    width: int
    scale: float                  # float32 values
    lo: int                       # qmin - zero_point, qmax - zero_point
    hi: int
    shift: float                  # q zero point - dq zero point (0 for a matched pair)
    dq_scale: float
    qtype: str
