"""The sample fat policy as a foreign fat policy: an ONNX graph whose body is a graph input.

    python examples/export_foreign.py OUT_DIR [--family reach|locomotion]

writes OUT_DIR/fat_<family>.onnx and OUT_DIR/fat_<family>.toml: the sample policy's network for one
task family (a transformer over joint tokens) with its joint descriptors as an embodiment input
`desc` (joints, 14), and an interface with one `[bodies.NAME]` table per body of that family and
joint count in the checkpoint's registry (the descriptors it was trained with). The graph is what
another team might hand over: xcompile knows nothing of it but the interface, so `xcompile build
fat_reach.onnx --interface fat_reach.toml --target panda` runs the foreign front end (ONNX pinning
by constant folding, distill with the pinned graph as a black-box teacher) on a policy that does
its task. Only bodies with the most common joint count of the family are listed (the graph's
`desc` input has a fixed shape): panda and kuka_iiwa (7 joints) for reach, the five quadrupeds
(12) for locomotion.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xcompile.models.checkpoint import load_checkpoint


class OneFamily(nn.Module):
    def __init__(self, fat: nn.Module, family: str) -> None:
        super().__init__()
        self.fat, self.family = fat, family

    def forward(self, obs: torch.Tensor, desc: torch.Tensor) -> torch.Tensor:
        return self.fat.act(obs, desc, self.family)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--checkpoint", default="examples/fat_policy.pt")
    ap.add_argument("--family", default="reach", choices=["reach", "locomotion"])
    a = ap.parse_args(argv)
    ckpt = load_checkpoint(a.checkpoint)
    bodies = [e for e in ckpt.registry if e.get("family") == a.family]
    n = Counter(len(e["joints"]) for e in bodies).most_common(1)[0][0]
    bodies = [e for e in bodies if len(e["joints"]) == n]
    desc = np.asarray(bodies[0]["descriptors"], dtype=np.float32)
    n_obs = ckpt.config.global_dims[a.family] + 3 * n
    module = OneFamily(ckpt.model.eval(), a.family).eval()
    a.out.mkdir(parents=True, exist_ok=True)
    prog = torch.onnx.export(module, (torch.zeros(2, n_obs), torch.as_tensor(desc)), dynamo=True,
                             input_names=["obs", "desc"], output_names=["action"],
                             dynamic_shapes={"obs": {0: torch.export.Dim("batch")}, "desc": None},
                             opset_version=17, external_data=False, verbose=False)
    assert prog is not None
    onnx_path, toml_path = a.out / f"fat_{a.family}.onnx", a.out / f"fat_{a.family}.toml"
    prog.save(str(onnx_path))
    lines = ['format = "xcompile-interface/1"', 'observation = "obs"', 'action = "action"',
             f'family = "{a.family}"']
    for e in bodies:
        rows = ",\n  ".join("[" + ", ".join(str(v) for v in row) + "]"
                            for row in np.asarray(e["descriptors"], dtype=np.float32))
        lines += ["", f"[bodies.{e['name']}]", f"desc = [\n  {rows},\n]"]
    toml_path.write_text("\n".join(lines) + "\n")
    print(f"wrote {onnx_path} and {toml_path}: bodies {', '.join(e['name'] for e in bodies)}")


if __name__ == "__main__":
    main()
