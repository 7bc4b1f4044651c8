"""Hostile files that name other paths: recorded data, shard indexes, links in Hugging Face
and image folders, FIFOs, ONNX external data, and names holding line breaks. Each test
builds the hostile file, and a watch (an audit hook on opens and listings, and a spy on
``os.stat``/``os.lstat``) proves that the outside victim is never opened, listed or
measured."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdcli.data.sources import load_data
from kdcli.errors import DataError, FormatError, UnsafePickleError, UsageError, user_message

_WATCHED: list[str] = []
_TOUCHED: list[tuple[str, str]] = []
_LOCAL = threading.local()


def _hit(event: str, path: object, follow: bool = True) -> None:
    """Record ``event`` if ``path``, or where it leads (all its links followed, or all but
    the last one's when ``follow`` is false), is a watched path or lies under one."""
    if not _WATCHED or isinstance(path, int) or path is None or getattr(_LOCAL, "busy", False):
        return
    _LOCAL.busy = True  # os.path.realpath calls os.lstat: do not watch ourselves
    try:
        p = os.path.abspath(os.fsdecode(path))
        real = os.path.realpath(p) if follow else os.path.join(
            os.path.realpath(os.path.dirname(p)), os.path.basename(p))
    except (TypeError, ValueError, OSError):
        return
    finally:
        _LOCAL.busy = False
    if any(q == w or q.startswith(w + os.sep) for q in (p, real) for w in _WATCHED):
        _TOUCHED.append((event, p))


def _audit(event: str, args: tuple) -> None:
    if _WATCHED and event in ("open", "os.listdir", "os.scandir") and args:
        flags = args[2] if event == "open" and len(args) > 2 and isinstance(args[2], int) else 0
        _hit(event, args[0], follow=not flags & getattr(os, "O_NOFOLLOW", 0))


sys.addaudithook(_audit)


@pytest.fixture
def watch(monkeypatch) -> Iterator[Callable[..., list[tuple[str, str]]]]:
    """``watch(*paths)`` starts recording every open, listing, stat and lstat that reaches
    those paths (or what lies under them), directly or through links; it returns the list
    of what was touched so far."""
    real_stat, real_lstat = os.stat, os.lstat

    def stat(path, *a, follow_symlinks=True, **k):
        _hit("os.stat", path, follow_symlinks)
        return real_stat(path, *a, follow_symlinks=follow_symlinks, **k)

    def lstat(path, *a, **k):
        _hit("os.lstat", path, False)
        return real_lstat(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "lstat", lstat)

    def start(*paths: str | Path) -> list[tuple[str, str]]:
        _WATCHED.extend(os.path.realpath(p) for p in paths)
        return _TOUCHED

    yield start
    _WATCHED.clear()
    _TOUCHED.clear()


def one_line_error(result, code: int = 1) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def no_hang(fn: Callable[[], object], fifo: Path, seconds: float = 10) -> object:
    """Run ``fn``; if it is still running after ``seconds`` (blocked on ``fifo``), unblock
    it by opening the FIFO for writing, and fail."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(10)
        pytest.fail(f"blocked on the FIFO {fifo}")
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


def write_pngs(root: Path, count: int = 4, classes: tuple[str, ...] = ("a", "b")) -> Path:
    g = np.random.default_rng(0)
    for i in range(count):
        d = root / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 256, (8, 8), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def victim(tmp_path_factory) -> Path:
    """A folder of files the user never names: images, an .npz, a .npy."""
    d = tmp_path_factory.mktemp("victim")
    write_pngs(d / "imgs", 4)
    np.savez(d / "x.npz", inputs=np.zeros((20, 28, 28), np.uint8),
             labels=np.arange(20) % 10)
    np.save(d / "x.npy", np.zeros((4, 8, 8), np.uint8))
    return d


def test_inside_folder_reads_links_without_leaving_the_folder(tmp_path):
    from kdcli.io.files import inside_folder

    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "out").symlink_to("/etc")
    (d / "rel").symlink_to("sub")
    (d / "abs").symlink_to(d / "sub")
    (d / "loop").symlink_to("loop")
    real = Path(os.path.realpath(d))
    for name, want in [("a", real / "a"), ("rel/x", real / "sub" / "x"),
                       ("abs/x", real / "sub" / "x"), ("sub/../rel", real / "sub"),
                       ("out", None), ("out/passwd", None), ("../x", None), ("/etc", None),
                       ("loop", None), ("sub/../../x", None), ("rel/../out", None),
                       ("missing/../out", None)]:
        assert inside_folder(d, name) == want, name


# ------------------------------------------ 1. data paths recorded in a model file


def model_recording(teacher_file: Path, out: Path, data: str) -> Path:
    from kdcli.students.model_file import load_model, save_model

    mf = load_model(teacher_file)
    save_model(out, mf.model, mf.arch, mf.preprocessing, mf.num_classes,
               {**mf.training, "data": data, "test_data": data})
    return out


@pytest.mark.parametrize("recorded", ["npz", "dotdot", "folder", "/dev/zero", "/etc/shadow"])
def test_recorded_data_paths_are_never_opened(tmp_path, teacher_file, victim, cli, watch,
                                             recorded):
    spec = {"npz": str(victim / "x.npz"), "dotdot": f"../{victim.name}/x.npz",
            "folder": str(victim / "imgs")}.get(recorded, recorded)
    model = model_recording(teacher_file, tmp_path / "m.safetensors", spec)
    touched = watch(victim, "/dev/zero", "/etc/shadow")
    for args in (["export", "o.onnx", "--model", model],
                 ["calibrate-bias", "--model", model, "--target", "labels",
                  "--out", "c.safetensors"]):
        line = one_line_error(cli(*args))
        assert "--data" in line and "records" in line, line
    assert touched == []
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "c.safetensors").exists()


def test_recorded_data_is_used_when_named_again_and_bundled_sets_stay_allowed(
        tmp_path, teacher_file, victim, cli):
    model = model_recording(teacher_file, tmp_path / "m.safetensors", str(victim / "x.npz"))
    r = cli("calibrate-bias", "--model", model, "--target", "labels", "--data",
            victim / "x.npz", "--out", "c.safetensors", "--json")
    assert r.exit_code == 0, r.output
    model = model_recording(teacher_file, tmp_path / "b.safetensors", "mnist:test[:200]")
    r = cli("calibrate-bias", "--model", model, "--target", "labels", "--out",
            "d.safetensors", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["source"] == "mnist:test[:200]"


# ------------------------------------------ Hugging Face folders


@pytest.fixture
def hf_folder(tmp_path, tiny_vit_folder) -> Path:
    return tiny_vit_folder(tmp_path / "hf", max_shard_size="8KB")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hf_index_naming_a_torch_save_shard_needs_trust_pickle(hf_folder, tmp_path):
    from safetensors.torch import load_file

    from kdcli.teachers.formats import load_teacher

    index = hf_folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    shard = sorted(set(doc["weight_map"].values()))[0]
    tensors = load_file(hf_folder / shard)
    marker = tmp_path / "ran"
    torch.save({**tensors, "x": Payload(marker)}, hf_folder / "weights.bin")
    for k in tensors:
        doc["weight_map"][k] = "weights.bin"
    (hf_folder / shard).unlink()
    index.write_text(json.dumps(doc))
    with pytest.raises(UnsafePickleError, match="--trust-pickle"):
        load_teacher(hf_folder, probe=torch.zeros(2, 1, 8, 8))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json",
                                  "model.safetensors.index.json", "adapter_config.json"])
def test_hf_json_links_out_of_the_folder_are_refused(hf_folder, victim, watch, name):
    from kdcli.inspection import inspect_file
    from kdcli.output import Reporter
    from kdcli.teachers.formats import load_teacher

    outside = victim / name
    if (hf_folder / name).exists():
        (hf_folder / name).rename(outside)
    else:
        outside.write_text(json.dumps({"do_normalize": True, "image_mean": [0.5],
                                       "image_std": [0.5]}))
    (hf_folder / name).symlink_to(outside)
    touched = watch(victim)
    with pytest.raises(FormatError, match="outside"):
        load_teacher(hf_folder, probe=torch.zeros(2, 1, 8, 8))
    with pytest.raises(FormatError, match="outside"):
        inspect_file(hf_folder, Reporter("quiet"))
    assert touched == []


def test_hf_shard_link_out_of_the_folder_is_refused_unmeasured(hf_folder, victim, watch):
    from kdcli.teachers.formats import load_teacher

    doc = json.loads((hf_folder / "model.safetensors.index.json").read_text())
    shard = hf_folder / sorted(set(doc["weight_map"].values()))[0]
    shard.rename(victim / "s.safetensors")
    shard.symlink_to(victim / "s.safetensors")
    touched = watch(victim)
    with pytest.raises(FormatError, match="outside"):
        load_teacher(hf_folder, probe=torch.zeros(2, 1, 8, 8))
    assert touched == []


def test_transfer_shard_link_out_of_the_folder_is_refused_unmeasured(tmp_path, victim,
                                                                    teacher_file, watch):
    from kdcli.output import Reporter
    from kdcli.soft_targets import soft_targets
    from kdcli.transfer.reader import load_transfer_set

    index = tmp_path / "x.index.json"
    soft_targets([teacher_file], T=4.0, data="mnist[:300]", out=index, shard_size="100KB",
                 reporter=Reporter("quiet"))
    first = tmp_path / json.loads(index.read_text())["shards"][0]["file"]
    first.rename(victim / "s.safetensors")
    first.symlink_to(victim / "s.safetensors")
    touched = watch(victim)
    with pytest.raises(FormatError, match="leads out"):
        load_transfer_set(index)
    assert touched == []


# ------------------------------------------ 4, 5. links in image folders


@pytest.mark.parametrize("target", ["victim", "root", "image"])
def test_image_folder_links_out_are_refused_untouched(tmp_path, victim, watch, target):
    root = write_pngs(tmp_path / "imgs", 4)
    if target == "victim":
        (root / "c").symlink_to(victim / "imgs")
    elif target == "root":
        (root / "c").symlink_to("/")
    else:
        (root / "a" / "009.png").symlink_to(victim / "imgs" / "a" / "000.png")
    touched = watch(victim, "/proc", "/etc")
    with pytest.raises(DataError, match="outside"):
        load_data(str(root))
    assert touched == []


def test_links_inside_the_folder_still_work(tmp_path):
    root = write_pngs(tmp_path / "imgs", 4)
    (root / "c").mkdir()
    (root / "c" / "x.png").symlink_to(root / "a" / "000.png")
    (root / "d").symlink_to("a")
    (tmp_path / "alias").symlink_to(root)  # the folder the user names may be a link
    for named in (root, tmp_path / "alias"):
        ds = load_data(str(named))
        assert len(ds) == 4 + 1 + 2 and ds.class_names == ["a", "b", "c", "d"]


def test_an_image_swapped_for_a_link_while_decoding_is_not_read(tmp_path, victim, watch,
                                                                monkeypatch):
    import kdcli.data.images as images

    root = write_pngs(tmp_path / "imgs", 4)
    real_plan = images._plan

    def plan_then_swap(paths, opts):
        got = real_plan(paths, opts)
        swapped = root / "b" / "003.png"
        swapped.unlink()
        swapped.symlink_to(victim / "imgs" / "a" / "000.png")
        return got

    monkeypatch.setattr(images, "_plan", plan_then_swap)
    touched = watch(victim)
    with pytest.raises(DataError, match="003.png"):
        load_data(str(root))
    assert [t for t in touched if t[0] == "open"] == []


@pytest.mark.parametrize("plant", ["inputs.npy", "manifest.json"])
def test_links_planted_in_the_image_cache_are_not_read(tmp_path, victim, image_cache,
                                                      monkeypatch, plant):
    import kdcli.data.images as images

    root = write_pngs(tmp_path / "imgs", 4)
    first = load_data(str(root)).inputs.clone()
    (entry,) = (image_cache / "images").iterdir()
    (entry / plant).rename(victim / plant)
    if plant == "inputs.npy":  # the victim holds other pixels of the same shape
        np.save(victim / plant, 255 - first.numpy())
    (entry / plant).symlink_to(victim / plant)
    decoded: list[Path] = []
    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda *a: decoded.append(a[0]) or real(*a))
    assert torch.equal(load_data(str(root)).inputs, first)
    assert len(decoded) == 4  # the linked cache file was not taken


# ------------------------------------------ 6. FIFOs


@pytest.mark.parametrize("name", ["x.npy", "x.csv", "x.safetensors", "train-images-idx3-ubyte"])
def test_a_fifo_as_data_is_refused_without_blocking(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="regular file"):
        no_hang(lambda: load_data(str(fifo)), fifo)


@pytest.mark.parametrize("name", ["m.safetensors", "m.onnx"])
def test_a_fifo_as_a_model_is_refused_without_blocking(tmp_path, name):
    from kdcli.evaluate import evaluate
    from kdcli.output import Reporter
    from kdcli.sweep import sweep

    fifo = tmp_path / name
    os.mkfifo(fifo)
    with pytest.raises(DataError):
        no_hang(lambda: evaluate([fifo], "mnist:test[:10]", reporter=Reporter("quiet")), fifo)
    with pytest.raises(DataError):
        no_hang(lambda: sweep(fifo, temperatures=[2.0], hidden=[8], out_dir=tmp_path / "sw",
                              reporter=Reporter("quiet")), fifo)


def test_a_fifo_in_an_idx_folder_is_not_opened(tmp_path):
    fifo = tmp_path / "train-images-idx3-ubyte"
    os.mkfifo(fifo)
    write_pngs(tmp_path, 2)
    ds = no_hang(lambda: load_data(str(tmp_path)), fifo)
    assert len(ds) == 2  # read as the image folder it is


@pytest.mark.parametrize("plant", ["inputs.npy", "manifest.json"])
def test_a_fifo_planted_in_the_image_cache_does_not_block(tmp_path, image_cache, plant):
    root = write_pngs(tmp_path / "imgs", 4)
    first = load_data(str(root)).inputs.clone()
    (entry,) = (image_cache / "images").iterdir()
    (entry / plant).unlink()
    os.mkfifo(entry / plant)
    got = no_hang(lambda: load_data(str(root)).inputs, entry / plant)
    assert torch.equal(got, first)


def test_a_fifo_as_an_image_is_not_opened(tmp_path):
    root = write_pngs(tmp_path / "imgs", 4)
    os.mkfifo(root / "a" / "zzz.png")
    ds = no_hang(lambda: load_data(str(root)), root / "a" / "zzz.png")
    assert len(ds) == 4


# ------------------------------------------ 7. names with line breaks


def test_names_with_line_breaks_stay_on_one_line(tmp_path, cli):
    root = write_pngs(tmp_path / "imgs", 4)
    evil = root / "a" / "x\nError: all is fine.png"
    evil.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    line = one_line_error(cli("train", "--data", root, "--epochs", 1, "--out", "m.safetensors"))
    assert "x\\nError: all is fine.png" in line, line
    (tmp_path / "t.csv").write_text('"a\nError: fine",label\n' + "1,0\n" * 10 + "zz,1\n")
    line = one_line_error(cli("train", "--data", "t.csv", "--epochs", 1, "--out",
                              "m.safetensors"))
    assert "a\\nError: fine" in line, line
    folder = tmp_path / "cls"
    write_pngs(folder, 2, ("ok\x1b[2J\nError: x",))
    Image.new("L", (9, 9)).save(folder / "ok\x1b[2J\nError: x" / "big.png")
    line = one_line_error(cli("train", "--data", folder, "--epochs", 1, "--out",
                              "m.safetensors"))
    assert "\x1b" not in line


def test_column_and_file_names_are_quoted_in_library_errors(tmp_path):
    from kdcli.data.base import DataOptions

    (tmp_path / "t.csv").write_text('"a\nError: fine",label\n1,0\n2,1\n')
    with pytest.raises(DataError) as e:
        load_data(str(tmp_path / "t.csv"), options=DataOptions(label_column="kind"))
    assert "\n" not in str(e.value) and "a\\nError: fine" in str(e.value)
    root = write_pngs(tmp_path / "imgs", 2)
    (root / "a" / "x\ny.png").write_bytes(b"junk")
    with pytest.raises(DataError) as e:
        load_data(str(root))
    assert "\n" not in str(e.value) and "x\\ny.png" in str(e.value)


def test_usage_errors_with_escapes_stay_on_one_line(cli):
    line = one_line_error(cli("train", "--x\x1b[2J"), code=2)
    assert "\x1b" not in line


def test_user_message_is_always_one_line():
    for exc in (UsageError("a\nb", "c\rd"), ValueError("x\ny"), FileNotFoundError(2, "no", "p\nq")):
        message, _ = user_message(exc)
        assert message.isprintable(), message


# ------------------------------------------ 8. ONNX external data


def onnx_with_external(path: Path, location: str) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((784, 10), np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(7840 * 4))):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 784])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])], [w])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                     .SerializeToString())
    return path


@pytest.mark.parametrize("how", ["dotdot", "absolute", "link", "nested", "fifo"])
def test_onnx_external_data_out_of_the_folder_is_refused_naming_it(tmp_path, victim, watch,
                                                                   how):
    from kdcli.teachers.formats import load_teacher

    secret = victim / "w.bin"
    secret.write_bytes(np.ones(7840, np.float32).tobytes())
    (tmp_path / "m").mkdir()
    location = {"dotdot": f"../../{victim.name}/w.bin", "absolute": str(secret),
                "link": "w.bin", "nested": "sub/../../w.bin", "fifo": "w.bin"}[how]
    if how == "link":
        (tmp_path / "m" / "w.bin").symlink_to(secret)
    if how == "fifo":
        os.mkfifo(tmp_path / "m" / "w.bin")
    p = onnx_with_external(tmp_path / "m" / "evil.onnx", location)
    touched = watch(victim)
    with pytest.raises(FormatError) as e:
        no_hang(lambda: load_teacher(p), tmp_path / "m" / "w.bin")
    msg = str(e.value)
    assert "\n" not in msg and "corrupt" not in msg and repr(location) in msg, msg
    assert touched == []


def test_onnx_external_data_inside_the_folder_loads(tmp_path):
    from kdcli.teachers.formats import load_teacher

    (tmp_path / "w.bin").write_bytes(np.ones(7840, np.float32).tobytes())
    t = load_teacher(onnx_with_external(tmp_path / "ok.onnx", "w.bin"),
                     probe=torch.zeros(2, 784))
    assert t.num_classes == 10


def test_the_image_cache_is_used_when_a_checked_image_is_a_link(tmp_path, monkeypatch):
    import kdcli.data.images as images

    root = write_pngs(tmp_path / "imgs", 4)
    (root / "b" / "zzz.png").symlink_to(root / "a" / "000.png")  # the last file: checked
    decodes = []
    real = images._decode_all
    monkeypatch.setattr(images, "_decode_all", lambda *a: decodes.append(1) or real(*a))
    first, second = load_data(str(root)), load_data(str(root))
    assert len(decodes) == 1  # the second load read the cache
    assert bool((first.inputs[:] == second.inputs[:]).all())
