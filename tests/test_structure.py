"""The package's structure, held to what it promises: one job per module, no import cycles, the
manager and the report know no pass by name, cache keys follow every line of code a pass runs, and
a cached build's artifacts are where it says they are."""

from __future__ import annotations

import ast
import importlib
import sys
import textwrap
from pathlib import Path

import pytest

import xcompile
from xcompile.artifact import Artifact
from xcompile.build import run_build
from xcompile.manager import cache as cache_mod
from xcompile.manager.settings import PlanStep, make_config
from xcompile.passes import DEFAULT_PLAN
from xcompile.passes.base import REGISTRY, PassConfig, all_passes

PKG = Path(xcompile.__file__).parent
MODULES = sorted(p for p in PKG.rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """xcompile modules imported by `path` (at any depth: top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n.startswith("xcompile")}
    known = {_module_name(p) for p in MODULES}
    return {n for n in found if n in known}


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in MODULES
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"split these by job: {long}"


def test_no_import_cycle_inside_the_package():
    graph = {_module_name(p): _imports(p) - {_module_name(p)} for p in MODULES}
    # A package's __init__ is imported with any of its modules; it may not import them back.
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


def test_manager_and_report_name_no_pass():
    names = set(all_passes())
    places = [*(PKG / "manager").glob("*.py"), PKG / "report.py", PKG / "render.py",
              PKG / "build.py"]
    for path in places:
        strings = {n.value for n in ast.walk(ast.parse(path.read_text()))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not strings & names, f"{path.name} names passes {strings & names}"


def test_default_plan_is_registered_in_order():
    assert all(n in REGISTRY for n in DEFAULT_PLAN)


# ------------------------------------------------------------------------------ cache keys


def test_editing_a_helper_module_invalidates_the_pass(tmp_path, monkeypatch):
    """A pass's cache key covers the modules of its package that it imports, directly or not."""
    pkg = tmp_path / "xc_testpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("from xc_testpkg import deeper\nSCALE = 1\n")
    (pkg / "deeper.py").write_text("OFFSET = 0\n")
    (pkg / "unrelated.py").write_text("X = 1\n")
    (pkg / "mypass.py").write_text(textwrap.dedent('''
        from xcompile.passes.base import Pass
        from xc_testpkg.helper import SCALE

        class HelperPass(Pass):
            name = "t-helper"
            input_format = "onnx"
            output_format = "onnx"

            def run(self, art, cfg, ctx):
                raise NotImplementedError
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("xc_testpkg.mypass")
    REGISTRY["t-helper"] = mod.HelperPass
    try:
        (tmp_path / "in.onnx").write_bytes(b"graph")
        art = Artifact.create("onnx", tmp_path / "in.onnx", "a1")
        step = PlanStep("t-helper", PassConfig())

        def key() -> str:
            return cache_mod.cache_key(art, step, {"robot": "x"}, 0, "fast")

        first = key()
        assert key() == first                                   # same code, same key
        (pkg / "unrelated.py").write_text("X = 2\n")
        assert key() == first                                   # a module it does not import
        (pkg / "deeper.py").write_text("OFFSET = 1\n")          # imported through helper.py
        second = key()
        assert second != first
        (pkg / "helper.py").write_text("from xc_testpkg import deeper\nSCALE = 2\n")
        assert key() not in (first, second)
        names = [n for n, _ in cache_mod.module_closure("xc_testpkg.mypass")]
        assert names == ["xc_testpkg", "xc_testpkg.deeper", "xc_testpkg.helper",
                         "xc_testpkg.mypass"]
    finally:
        REGISTRY.pop("t-helper", None)
        for m in [m for m in sys.modules if m.startswith("xc_testpkg")]:
            del sys.modules[m]


def test_a_real_pass_key_covers_the_simulator():
    closure = dict(cache_mod.module_closure("xcompile.passes.distill"))
    assert {"xcompile.passes.distill", "xcompile.evaluate", "xcompile.sim.env"} <= set(closure)


def test_a_target_is_keyed_by_what_it_says_not_by_its_file(tmp_path):
    """A target changed after loading is another target (it keeps its TOML's path); the same TOML
    in another folder is the same target."""
    from tests.conftest import short_robot
    from xcompile.targets import load_hardware, load_robot

    cpu = load_hardware("cpu")
    a1 = load_robot("a1")
    key = cache_mod.target_fingerprint(a1, cpu)
    assert short_robot("a1", 3.0).source == a1.source
    assert cache_mod.target_fingerprint(short_robot("a1", 3.0), cpu) != key
    copy = tmp_path / "a1.toml"
    copy.write_text(Path(a1.source).read_text())
    assert cache_mod.target_fingerprint(load_robot(str(copy)), cpu) == key


# ------------------------------------------------------------------------------ artifacts


def test_cached_artifacts_exist_and_ids_do_not_depend_on_the_work_folder(tiny_fat_ckpt,
                                                                         tmp_path):
    """Every artifact path a build reports exists after the cache commit renamed its work folder,
    and two cold builds (fresh caches, so different work folders) make the same artifact ids."""
    plan = [PlanStep(n, make_config(n, o)) for n, o in (
        ("pin-embodiment", {"n_check_obs": 64, "check_episodes": 0}),
        ("export-onnx", {"n_check_obs": 64}))]
    runs = []
    for i in range(2):
        res = run_build(tiny_fat_ckpt, "a1", None, plan, tmp_path / f"out{i}",
                        tmp_path / f"cache{i}", episodes=1, profile="fast", rollout=False)
        for st in res.stages:
            assert st.artifact is not None and st.artifact.path.is_file()
            assert str(tmp_path / f"cache{i}" / "tmp") not in str(st.artifact.meta)
        runs.append([st.artifact.id for st in res.stages])
    assert runs[0] == runs[1]
    assert sorted(p.name for p in (tmp_path / "out0").iterdir()) == [
        "manifest.json", "policy.onnx", "report.json", "report.md", "stages.png"]


def test_a_budget_set_to_its_class_default_is_not_the_profiles():
    """The build profile fills only the fields a user did not set, so `episodes_per_round = 8`
    in a build file (the class default; the default profile's is 4) is another build than none:
    the cache must not hand back the profile's result for it (it once did)."""
    from xcompile.artifact import Artifact
    from xcompile.manager import cache as cache_mod
    from xcompile.manager.settings import PlanStep
    from xcompile.passes.distill import DistillConfig

    art = Artifact.create("onnx", Path(__file__), "a1")
    unset = PlanStep("distill", DistillConfig())
    given = PlanStep("distill", DistillConfig(episodes_per_round=8))
    assert unset.config.model_dump() == given.config.model_dump()
    keys = {cache_mod.cache_key(art, s, {"robot": "x"}, 0, "default") for s in (unset, given)}
    assert len(keys) == 2
