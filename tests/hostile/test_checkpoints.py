"""Hostile checkpoints: a file's own numbers must not hang the loader or exhaust memory.

Each case starts from a valid tiny checkpoint, edits what a stranger could edit (the config's sizes,
the registry, the tensors' shapes, strides and storage, the free-form parts, the archive itself),
and must be refused with a `CheckpointError` that names what is wrong, within milliseconds, and
through the CLI with exit code 2 and no traceback. The limits live in `xcompile.models.fat`.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import re
import struct
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import xcompile.models.checkpoint as ckpt_mod
from xcompile.cli import app
from xcompile.errors import CheckpointError
from xcompile.models.checkpoint import convert_checkpoint, load_checkpoint, save_checkpoint
from xcompile.models.fat import (
    MAX_PICKLE_BYTES,
    MAX_STATE_TENSORS,
    FatConfig,
    FatPolicy,
    count_params,
)

runner = CliRunner()
FAST_S = 10.0            # generous: every refusal here takes milliseconds
KEY = "blocks.0.fc1.weight"  # (d_ff, d_model) = (64, 32) in the tiny checkpoint
SHAPE = (64, 32)
HUGE = (10**6, 10**6)


def _huge_view() -> torch.Tensor:
    """10^12 elements over one stored float: torch.save writes 4 bytes of data for it."""
    return torch.zeros(1).expand(*HUGE)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _cli_out(res) -> str:
    return res.output + (getattr(res, "stderr", "") or "")


def _refused(path: Path, needles: tuple[str, ...]) -> CheckpointError:
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    elapsed = time.perf_counter() - t0
    assert elapsed < FAST_S, f"refusal took {elapsed:.1f}s"
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    assert "Traceback" not in msg and len(msg) < 2000
    return info.value


def _cli_refuses(path: Path, needles: tuple[str, ...]) -> None:
    t0 = time.perf_counter()
    res = runner.invoke(app, ["inspect", str(path)])
    assert time.perf_counter() - t0 < FAST_S
    out = _cli_out(res)
    assert res.exit_code == 2, out
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in out and "error:" in out
    for needle in needles:   # rich wraps long lines: compare without whitespace
        assert _squash(needle) in _squash(out), f"{needle!r} not in: {out}"


# --------------------------------------------------------------------------------------------
# .pt cases: (id, edit of the raw payload, substrings the error must contain)


def _cfg(**update: Any) -> Callable[[dict], None]:
    return lambda p: p["config"].update(update)


def _body(**update: Any) -> Callable[[dict], None]:
    return lambda p: p["registry"][0].update(update)


def _tensor(key: str, make: Callable[[], Any]) -> Callable[[dict], None]:
    return lambda p: p["state_dict"].__setitem__(key, make())


def _set(key: str, make: Callable[[], Any]) -> Callable[[dict], None]:
    return lambda p: p.__setitem__(key, make())


def _desc_row(value: Any) -> Callable[[dict], None]:
    def edit(p: dict) -> None:
        p["registry"][0]["descriptors"][0][0] = value
    return edit


def _cycle() -> list:
    a: list = []
    a.append(a)
    return a


def _dag_bomb(levels: int) -> list:
    x: list = [0]
    for _ in range(levels):   # each level: two references to one list, so 2^levels leaves
        x = [x, x]
    return x


def _deep(n: int) -> list:
    x: list = []
    for _ in range(n):
        x = [x]
    return x


class _RawTensor:
    """Pickles as `_rebuild_tensor_v2(storage, offset, size, stride)` with arbitrary numbers."""

    def __init__(self, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage = torch.zeros(4).untyped_storage()
        self.args = (offset, size, stride)

    def __reduce_ex__(self, proto):
        offset, size, stride = self.args
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, offset, torch.Size(size), stride, False,
                 collections.OrderedDict()))


PT_CASES: list[tuple[str, Callable[[dict], Any], tuple[str, ...]]] = [
    # the architecture config: sizes
    ("n_layers_huge", _cfg(n_layers=10**6), ("n_layers = 1000000", "256")),
    ("d_model_huge", _cfg(d_model=10**9), ("d_model = 1000000000", "8192")),
    ("d_ff_huge", _cfg(d_ff=10**9), ("d_ff = 1000000000", "65536")),
    ("n_heads_huge", _cfg(n_heads=10**9), ("n_heads = 1000000000",)),
    ("n_heads_not_dividing", _cfg(n_heads=3), ("n_heads=3 must divide d_model=32",)),
    ("desc_hidden_huge", _cfg(desc_hidden=10**8), ("desc_hidden = 100000000", "65536")),
    ("desc_layers_huge", _cfg(desc_layers=10**6), ("desc_layers = 1000000", "64")),
    ("desc_dim_huge", _cfg(desc_dim=10**6), ("desc_dim = 1000000", "1024")),
    ("global_dim_huge", _cfg(global_dims={"locomotion": 10**9, "reach": 9}),
     ("global_dims.locomotion = 1000000000", "65536")),
    ("many_families", _cfg(global_dims={f"f{i}": 1 for i in range(10**5)}),
     ("global_dims", "100,000", "MAX_FAMILIES")),
    ("params_over_limit", _cfg(d_model=8192, n_heads=8, d_ff=65536, n_layers=256),
     ("parameters", "2,000,000,000", "MAX_PARAMS")),
    ("config_bigger_than_the_file", _cfg(d_model=1024, n_heads=8, d_ff=4096, n_layers=8),
     ("config describes 100,", "parameters, more than its")),
    ("joint_state_dim_wrong", _cfg(joint_state_dim=4), ("joint_state_dim = 4",)),
    # the architecture config: types and signs
    ("d_model_string", _cfg(d_model="32"), ("d_model = '32'", "valid integer")),
    ("d_model_float", _cfg(d_model=32.0), ("d_model = 32.0", "valid integer")),
    ("n_layers_bool", _cfg(n_layers=True), ("n_layers = True", "valid integer")),
    ("d_model_tensor", _cfg(d_model=torch.tensor(32)), ("d_model = a Tensor",)),
    ("d_model_huge_view", _cfg(d_model=_huge_view()), ("d_model = a Tensor of shape",)),
    ("d_model_negative", _cfg(d_model=-32), ("d_model = -32", "greater than 0")),
    ("n_layers_zero", _cfg(n_layers=0), ("n_layers = 0",)),
    ("d_model_600_digits", _cfg(d_model=10**600), ("d_model = an integer of",)),
    ("global_dim_string", _cfg(global_dims={"locomotion": "12", "reach": 9}),
     ("global_dims.locomotion = '12'",)),
    ("family_reserved", _cfg(global_dims={"keys": 12, "reach": 9}), ("'keys'",)),
    ("family_dotted", _cfg(global_dims={"a.b": 12, "reach": 9}), ("'a.b'",)),
    ("family_not_string", _cfg(global_dims={7: 12, "reach": 9}), ("global_dims",)),
    ("config_unknown_field", _cfg(evil=1), ("evil",)),
    ("config_not_dict", _set("config", lambda: [1, 2, 3]), ("config", "list")),
    # the body registry
    ("many_bodies", lambda p: p.__setitem__("registry", [p["registry"][0]] * 10**5),
     ("100,000 bodies", "MAX_BODIES")),
    ("many_joints", _body(joints=["j"] * 10**5), ("'joints'", "100,000 joints", "MAX_JOINTS")),
    ("name_not_string", _body(name=5), ("'name' must be a string, not 5",)),
    ("name_huge_view", _body(name=_huge_view()), ("'name' must be a string", "Tensor")),
    ("name_too_long", _body(name="x" * 10**6), ("'name' is 1,000,000 characters long",)),
    ("name_empty", _body(name=""), ("'name' is empty",)),
    ("family_not_string", _body(family=["locomotion"]), ("'family' must be a string",)),
    ("joint_not_string", _body(joints=list(range(12))), ("joint 0 must be a string",)),
    ("joints_a_string", _body(joints="abc"), ("'joints' of body 'a1'",)),
    ("joints_twice", lambda p: p["registry"][0]["joints"].__setitem__(1, p["registry"][0][
        "joints"][0]), ("names a joint twice",)),
    ("urdf_not_string", _body(urdf=[1] * 10), ("'urdf' must be a string",)),
    ("descriptor_nan", _desc_row(float("nan")), ("body 'a1'", "NaN or Inf")),
    ("descriptor_600_digits", _desc_row(10**600), ("body 'a1'", "too large")),
    ("descriptor_string", _desc_row("1.0"), ("body 'a1'", "not numbers")),
    ("descriptor_bool", _desc_row(True), ("body 'a1'", "not numbers")),
    ("descriptors_too_wide", lambda p: p["registry"][0]["descriptors"][0].append(0.0),
     ("descriptors of body 'a1' must be 12 x 14",)),
    ("descriptors_huge_view", _body(descriptors=_huge_view()),
     ("descriptors of body 'a1' must be 12 x 14",)),
    ("descriptors_meta", _body(descriptors=torch.empty(12, 14, device="meta")),
     ("descriptors of body 'a1'", "meta")),
    ("registry_field_cycle", _body(note=_cycle()), ("field 'note' of body 'a1'", "nested")),
    ("registry_field_tensor", _body(note=_huge_view()), ("field 'note' of body 'a1'", "Tensor")),
    ("registry_not_list", _set("registry", lambda: {"a1": 1}), ("registry must be a list",)),
    # the weights: shape, strides, storage, layout, device, dtype (the huge view is 4 bytes on disk)
    ("tensor_huge_view", _tensor(KEY, _huge_view),
     (KEY, "(1000000, 1000000)", "(64, 32)", "do not fit")),
    ("tensor_stride0_right_shape", _tensor(KEY, lambda: torch.zeros(1).expand(*SHAPE)),
     (KEY, "strides (0, 0)", "not a dense tensor")),
    ("tensor_transposed", _tensor(KEY, lambda: torch.zeros(SHAPE[1], SHAPE[0]).t()),
     (KEY, "strides (1, 64)",)),
    ("tensor_every_other_row", _tensor(KEY, lambda: torch.zeros(2 * SHAPE[0], SHAPE[1])[::2]),
     (KEY, "strides (64, 1)",)),
    ("tensor_meta", _tensor(KEY, lambda: torch.empty(*HUGE, device="meta")), (KEY, "'meta'")),
    ("tensor_sparse", _tensor(KEY, lambda: torch.sparse_coo_tensor(
        torch.tensor([[0], [0]]), torch.tensor([1.0]), HUGE)), (KEY, "sparse_coo")),
    ("tensor_int", _tensor(KEY, lambda: torch.zeros(SHAPE, dtype=torch.int64)),
     (KEY, "dtype int64")),
    ("tensor_complex", _tensor(KEY, lambda: torch.zeros(SHAPE, dtype=torch.complex64)),
     (KEY, "dtype complex64")),
    ("tensor_quantized", _tensor(KEY, lambda: torch.quantize_per_tensor(
        torch.zeros(SHAPE), 0.1, 0, torch.qint8)), (KEY, "qint8")),
    ("tensor_a_list", _tensor(KEY, lambda: [0.0] * 10), (KEY, "is a list")),
    # torch.load (mmap=True) cannot give a tensor more bytes than its storage holds: it refuses
    # to grow the storage, which the loader reports as a corrupt file.
    ("tensor_past_its_storage", _tensor(KEY, lambda: _RawTensor(0, HUGE, (10**6, 1))),
     ("corrupt",)),
    ("tensor_negative_stride", _tensor(KEY, lambda: _RawTensor(0, (4,), (-1,))), ("corrupt",)),
    ("tensor_offset_past_storage", _tensor(KEY, lambda: _RawTensor(100, (4,), (1,))),
     ("corrupt",)),
    ("many_tensors", lambda p: p["state_dict"].update(
        {f"x{i}": p["state_dict"][KEY] for i in range(20_000)}),
     ("tensors, more than the limit of 10,000", "MAX_STATE_TENSORS")),
    ("tensor_name_not_string", lambda p: p["state_dict"].__setitem__(7, torch.zeros(1)),
     ("names (strings)",)),
    ("tensor_missing_and_extra", lambda p: p["state_dict"].__setitem__(
        "evil", p["state_dict"].pop(KEY)), ("do not fit", KEY, "'evil'")),
    ("state_dict_a_tensor", _set("state_dict", _huge_view), ("'state_dict' must map",)),
    # the header fields
    ("version_huge_view", _set("version", _huge_view), ("version a Tensor of shape",)),
    ("version_600_digits", _set("version", lambda: 10**600), ("version an integer of",)),
    ("version_float", _set("version", lambda: 2.0), ("version 2.0",)),
    ("format_huge_view", _set("format", _huge_view), ("format tag",)),
    ("payload_a_list", lambda p: [p], ("not a dict",)),
    ("payload_a_huge_view", lambda p: _huge_view(), ("not a dict",)),
    # the free-form extra
    ("extra_huge_view", _set("extra", _huge_view), ("'extra' must be a dict",)),
    ("extra_holds_huge_view", _set("extra", lambda: {"t": _huge_view()}),
     ("'extra'", "strides (0, 0)")),
    ("extra_cycle", _set("extra", lambda: {"a": _cycle()}), ("'extra'", "MAX_EXTRA_DEPTH")),
    ("extra_dag_bomb", _set("extra", lambda: {"a": _dag_bomb(20)}), ("'extra'", "MAX_EXTRA_ITEMS")),
    ("extra_deep_dag_bomb", _set("extra", lambda: {"a": _dag_bomb(100)}), ("'extra'", "MAX_EXTRA")),
    ("extra_deep", _set("extra", lambda: {"a": _deep(200)}), ("'extra'", "MAX_EXTRA_DEPTH")),
    ("extra_600_digits", _set("extra", lambda: {"a": 10**600}), ("'extra'", "integer of")),
    ("extra_text_repeated", _set("extra", lambda: {"a": ["x" * 10**6] * 100}),
     ("'extra'", "MAX_EXTRA_TEXT")),
    ("extra_long_list", _set("extra", lambda: {"a": [0] * 200_000}),
     ("'extra'", "MAX_EXTRA_ITEMS")),
]


@pytest.fixture(scope="module")
def raw_pt(tiny_fat_ckpt) -> bytes:
    return Path(tiny_fat_ckpt).read_bytes()


def _hostile_pt(raw_pt: bytes, tmp_path: Path, edit: Callable[[dict], Any]) -> Path:
    payload = torch.load(io.BytesIO(raw_pt), map_location="cpu", weights_only=True)
    out = edit(payload)
    path = tmp_path / "hostile.pt"
    torch.save(payload if out is None else out, path)
    return path


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning",
                            "ignore:torch.quantize_per_tensor:UserWarning",
                            "ignore:TypedStorage is deprecated:UserWarning")
@pytest.mark.parametrize("edit, needles", [c[1:] for c in PT_CASES], ids=[c[0] for c in PT_CASES])
def test_hostile_pt_refused_fast(raw_pt, tmp_path, edit, needles):
    path = _hostile_pt(raw_pt, tmp_path, edit)
    _refused(path, needles)
    _cli_refuses(path, needles)


def test_huge_view_is_tiny_on_disk_and_loads_fast(tmp_path):
    # What torch.save stores for a stride-0 view: its one-float storage and the 10^6 x 10^6 size.
    # Loading it costs nothing; only elementwise work afterwards would walk 10^12 elements, so the
    # loader checks shapes and strides first.
    path = tmp_path / "view.pt"
    torch.save({"w": _huge_view()}, path)
    assert path.stat().st_size < 10_000
    t0 = time.perf_counter()
    w = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["w"]
    assert time.perf_counter() - t0 < FAST_S
    assert w.shape == HUGE and w.stride() == (0, 0) and w.untyped_storage().nbytes() == 4


def test_storage_size_lie_refused(tmp_path):
    # The pickle says a storage has 10^12 floats; the archive holds 16 bytes for it.
    marker = object()

    class Lie(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 10**12) if obj is marker else None

    class T:
        def __reduce_ex__(self, proto):
            return (torch._utils._rebuild_tensor_v2, (marker, 0, torch.Size(HUGE), (10**6, 1),
                                                      False, collections.OrderedDict()))

    base = tmp_path / "base.pt"
    torch.save({"w": torch.zeros(4)}, base)
    payload = {"format": "xcompile.fat-policy", "version": 2, "state_dict": {KEY: T()}}
    buf = io.BytesIO()
    Lie(buf, protocol=2).dump(payload)
    path = tmp_path / "lie.pt"
    with zipfile.ZipFile(base) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, buf.getvalue() if name.endswith("data.pkl") else src.read(name))
    _refused(path, ("corrupt",))
    _cli_refuses(path, ("corrupt",))


def test_compressed_archive_refused(raw_pt, tmp_path):
    # torch.load reads deflated members, so a zip bomb's pickle would unpack in memory.
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(io.BytesIO(raw_pt)) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename),
                         compress_type=zipfile.ZIP_DEFLATED)
    needles = ("compressed", "data.pkl")
    _refused(path, needles)
    _cli_refuses(path, needles)


def test_oversized_pickle_refused(raw_pt, tmp_path):
    # The weights-only unpickler runs in Python (~1 s per MB of small values): a pickled
    # structure past MAX_PICKLE_BYTES is refused before it is read.
    path = _hostile_pt(raw_pt, tmp_path,
                       _set("extra", lambda: {"blob": "x" * (MAX_PICKLE_BYTES + 1)}))
    needles = ("MAX_PICKLE_BYTES",)
    _refused(path, needles)
    _cli_refuses(path, needles)


# --------------------------------------------------------------------------------------------
# .safetensors cases


@pytest.fixture(scope="module")
def st_parts(tiny_fat_ckpt, tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor], bytes]:
    """(xcompile header, tensors, file bytes) of the tiny checkpoint as .safetensors."""
    ck = load_checkpoint(tiny_fat_ckpt)
    path = tmp_path_factory.mktemp("st") / "tiny.safetensors"
    save_checkpoint(path, ck.model, ck.registry, ck.extra)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        header = json.loads(f.metadata()["xcompile"])
        state = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 - not iterable
    return header, state, path.read_bytes()


def _st_write(path: Path, header: dict | str, state: dict[str, torch.Tensor]) -> Path:
    meta = header if isinstance(header, str) else json.dumps(header)
    save_file(state, str(path), metadata={"xcompile": meta})
    return path


def _st_reshaped_header(data: bytes, key: str, shape: list[int]) -> bytes:
    """The file with `key`'s shape in the binary header replaced (its bytes left as they are)."""
    (n,) = struct.unpack("<Q", data[:8])
    head = json.loads(data[8:8 + n])
    head[key]["shape"] = shape
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _st_case(name: str, st_parts, tmp_path: Path) -> Path:
    header, state, data = st_parts
    header, state = json.loads(json.dumps(header)), dict(state)
    path = tmp_path / "hostile.safetensors"
    if name == "st_header_huge_view":
        # The nearest safetensors comes to a stride-0 view: a 10^6 x 10^6 shape over 4 bytes.
        path.write_bytes(_st_reshaped_header(data, KEY, list(HUGE)))
        return path
    if name == "st_header_overflowing_shape":
        path.write_bytes(_st_reshaped_header(data, KEY, [2**40, 2**40]))
        return path
    if name == "st_n_layers_huge":
        header["config"]["n_layers"] = 10**6
    elif name == "st_d_model_string":
        header["config"]["d_model"] = "32"
    elif name == "st_d_model_float":
        header["config"]["d_model"] = 32.0
    elif name == "st_many_bodies":
        header["registry"] = [{}] * 10**5
    elif name == "st_name_not_string":
        header["registry"][0]["name"] = {"x": 1}
    elif name == "st_wrong_shape":
        state[KEY] = state[KEY].reshape(32, 64).contiguous()
    elif name == "st_int_tensor":
        state[KEY] = state[KEY].to(torch.int32)
    elif name == "st_many_tensors":
        state.update({f"x{i}": torch.zeros(1) for i in range(MAX_STATE_TENSORS + 1)})
    elif name == "st_json_deep":
        return _st_write(path, "[" * 100_000 + "]" * 100_000, state)
    elif name == "st_json_5000_digits":
        return _st_write(path, '{"format": ' + "1" * 5000 + "}", state)
    elif name == "st_version_string":
        header["version"] = "2"
    else:
        raise AssertionError(name)
    return _st_write(path, header, state)


ST_CASES: list[tuple[str, tuple[str, ...]]] = [
    ("st_header_huge_view", ("cannot read", "safetensors")),
    ("st_header_overflowing_shape", ("cannot read", "safetensors")),
    ("st_n_layers_huge", ("n_layers = 1000000", "256")),
    ("st_d_model_string", ("d_model = '32'",)),
    ("st_d_model_float", ("d_model = 32.0",)),
    ("st_many_bodies", ("100,000 bodies", "MAX_BODIES")),
    ("st_name_not_string", ("'name' must be a string",)),
    ("st_wrong_shape", (KEY, "(32, 64)", "(64, 32)")),
    ("st_int_tensor", (KEY, "dtype int32")),
    ("st_many_tensors", ("MAX_STATE_TENSORS",)),
    ("st_json_deep", ("not valid JSON",)),
    ("st_json_5000_digits", ("not valid JSON",)),
    ("st_version_string", ("version '2'",)),
]


@pytest.mark.parametrize("name, needles", ST_CASES, ids=[c[0] for c in ST_CASES])
def test_hostile_safetensors_refused_fast(st_parts, tmp_path, name, needles):
    path = _st_case(name, st_parts, tmp_path)
    _refused(path, needles)
    _cli_refuses(path, needles)


def test_safetensors_cannot_store_a_view(tmp_path):
    # safetensors has no strides: a view can only be stored by copying it, or refused.
    with pytest.raises(ValueError, match="non contiguous"):
        save_file({"w": torch.zeros(1).expand(4, 4)}, str(tmp_path / "v.safetensors"))


# --------------------------------------------------------------------------------------------
# limits themselves


def test_param_count_is_exact():
    for cfg in (FatConfig(), FatConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, desc_hidden=32,
                                       desc_layers=1),
                FatConfig(global_dims={"a": 3, "b-2": 5, "_c": 1}, desc_layers=2, desc_dim=7)):
        assert cfg.param_count() == count_params(FatPolicy(cfg))


def test_real_sizes_are_within_the_limits():
    # The sample checkpoint's size, bench's largest, and test_reliability's 200 MB one.
    for fields in (dict(d_model=256, n_layers=6, n_heads=8, d_ff=768),
                   dict(d_model=512, n_layers=6, n_heads=8, d_ff=2048, desc_hidden=1024),
                   dict(d_model=16, n_layers=1, n_heads=2, d_ff=16, desc_hidden=4096,
                        desc_layers=4)):
        FatConfig(**fields)


def test_valid_edits_still_load(raw_pt, tmp_path):
    # A contiguous tensor in a larger storage (a slice at an offset) and extra keys of plain data.
    def edit(p: dict) -> None:
        big = torch.randn(3 * SHAPE[0] * SHAPE[1])
        p["state_dict"][KEY] = big[SHAPE[0] * SHAPE[1]:2 * SHAPE[0] * SHAPE[1]].view(SHAPE)
        p["registry"][0]["note"] = {"source": "lab", "runs": [1, 2, 3]}
        p["extra"] = {"t": torch.arange(4), "seed": 2**100}
    ck = load_checkpoint(_hostile_pt(raw_pt, tmp_path, edit))
    assert ck.registry[0]["note"]["runs"] == [1, 2, 3]


# --------------------------------------------------------------------------------------------
# convert


@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_onto_a_directory(tiny_fat_ckpt, tmp_path, overwrite):
    dest = tmp_path / "out.safetensors"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is a directory"):
        convert_checkpoint(tiny_fat_ckpt, dest, overwrite=overwrite)
    res = runner.invoke(app, ["convert", tiny_fat_ckpt, str(dest),
                              *(["--overwrite"] if overwrite else [])])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    assert "isadirectory" in _squash(_cli_out(res)) and "Traceback" not in _cli_out(res)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_convert_into_a_missing_folder(tiny_fat_ckpt, tmp_path):
    dest = tmp_path / "nope" / "out.safetensors"
    res = runner.invoke(app, ["convert", tiny_fat_ckpt, str(dest)])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), _cli_out(res)
    assert "doesnotexist" in _squash(_cli_out(res))
    assert not (tmp_path / "nope").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        convert_checkpoint(tiny_fat_ckpt, tmp_path / "afile" / "out.pt")


def test_convert_of_a_hostile_source_writes_nothing(raw_pt, tmp_path):
    src = _hostile_pt(raw_pt, tmp_path, _cfg(n_layers=10**6))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = runner.invoke(app, ["convert", str(src), str(out_dir / "x.safetensors")])
    assert res.exit_code == 2 and "n_layers" in _cli_out(res)
    assert list(out_dir.iterdir()) == []


def test_failed_convert_keeps_the_old_output(tiny_fat_ckpt, tmp_path, monkeypatch):
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"old")
    real = ckpt_mod.load_checkpoint

    def failing_reload(path):
        if Path(path).parent == tmp_path:   # the check of the freshly written file
            raise CheckpointError("simulated failure of the read-back")
        return real(path)

    monkeypatch.setattr(ckpt_mod, "load_checkpoint", failing_reload)
    with pytest.raises(CheckpointError, match="simulated"):
        convert_checkpoint(tiny_fat_ckpt, dest, overwrite=True)
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]   # no temp file left


def test_convert_overwrite_is_atomic_and_complete(tiny_fat_ckpt, tmp_path):
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"old")
    out = convert_checkpoint(tiny_fat_ckpt, dest, overwrite=True)
    assert out.path == dest and out.n_bytes == dest.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    assert load_checkpoint(dest).registry == load_checkpoint(tiny_fat_ckpt).registry


def test_save_onto_a_directory(tiny_fat_ckpt, tmp_path):
    ck = load_checkpoint(tiny_fat_ckpt)
    (tmp_path / "d.pt").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        save_checkpoint(tmp_path / "d.pt", ck.model, ck.registry)
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write"):
        save_checkpoint(tmp_path / "f" / "x.pt", ck.model, ck.registry)


def test_save_refuses_what_load_would_refuse(tiny_fat_ckpt, tmp_path):
    ck = load_checkpoint(tiny_fat_ckpt)
    with pytest.raises(CheckpointError, match="MAX_PICKLE_BYTES"):
        save_checkpoint(tmp_path / "big.pt", ck.model, ck.registry,
                        extra={"blob": "x" * (MAX_PICKLE_BYTES + 1)})
    assert list(tmp_path.iterdir()) == []
