"""Generate arm5.urdf: a 5-joint arm that ships with nobody, to show a body the fat policy never saw.

Its kinematics differ from every arm in the sample checkpoint (panda 7 joints, kuka_iiwa 7, xarm6 6):
base yaw, three pitch joints (shoulder, elbow, wrist) and a wrist roll, on links of 0.30 / 0.38 /
0.32 / 0.12 m built from cylinders. Masses and inertias come from the solid-cylinder formulas.
`arm5.toml` beside it is the robot target: `xcompile build ... --target examples/unseen_arm/arm5.toml`.

    python examples/unseen_arm/make_arm5.py
"""

from pathlib import Path

OUT = Path(__file__).resolve().parent / "arm5.urdf"

RADIUS = 0.04
#        link,       length, mass, joint axis of the joint that moves it, limits (rad), effort
LINKS = [("base", 0.10, 4.0, None, None, None),
         ("turret", 0.30, 3.0, "0 0 1", (-2.9, 2.9), 60.0),
         ("upper_arm", 0.38, 2.5, "0 1 0", (-1.8, 1.8), 60.0),
         ("forearm", 0.32, 1.8, "0 1 0", (-2.5, 2.5), 40.0),
         ("wrist", 0.12, 0.8, "0 1 0", (-2.0, 2.0), 20.0),
         ("flange", 0.06, 0.3, "0 0 1", (-3.0, 3.0), 10.0)]
JOINTS = ["base_yaw", "shoulder", "elbow", "wrist_pitch", "wrist_roll"]


def inertia(m: float, length: float) -> str:
    ixx = m * (3 * RADIUS**2 + length**2) / 12
    izz = m * RADIUS**2 / 2
    return f'<inertia ixx="{ixx:.5f}" iyy="{ixx:.5f}" izz="{izz:.5f}" ixy="0" ixz="0" iyz="0"/>'


def link(name: str, length: float, mass: float) -> str:
    shape = f'<cylinder radius="{RADIUS}" length="{length}"/>'
    origin = f'<origin xyz="0 0 {length / 2:.4f}"/>'
    return (f'  <link name="{name}">\n'
            f'    <inertial>{origin}<mass value="{mass}"/>{inertia(mass, length)}</inertial>\n'
            f'    <visual>{origin}<geometry>{shape}</geometry>'
            f'<material name="grey"><color rgba="0.6 0.6 0.65 1"/></material></visual>\n'
            f'    <collision>{origin}<geometry>{shape}</geometry></collision>\n'
            f'  </link>\n')


def main() -> None:
    parts = ['<?xml version="1.0"?>\n<robot name="arm5">\n']
    parts += [link(n, ln, m) for n, ln, m, *_ in LINKS]
    for (parent, plen, *_), (child, _, _, axis, (lo, hi), effort), jname in zip(
            LINKS[:-1], LINKS[1:], JOINTS):
        parts.append(
            f'  <joint name="{jname}" type="revolute">\n'
            f'    <parent link="{parent}"/><child link="{child}"/>\n'
            f'    <origin xyz="0 0 {plen}"/><axis xyz="{axis}"/>\n'
            f'    <limit lower="{lo}" upper="{hi}" effort="{effort}" velocity="3.0"/>\n'
            f'  </joint>\n')
    parts.append("</robot>\n")
    OUT.write_text("".join(parts))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
