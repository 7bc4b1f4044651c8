"""Resources: memory bombs refused before allocation, ONNX runs that never end, files that
change under a running command, signals and temporaries (issue 27, "Resources").

Every bomb here is refused from its shapes before anything is allocated; where the old code
would have allocated the bomb, the test makes that step fail loudly instead (never allocate).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcli.errors import ResourceError

ROOT = Path(__file__).parents[1]


def one_line_error(result, code: int = 1) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
            "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from kdcli.preprocessing import Preprocessing
    from kdcli.students.base import Architecture, build_model
    from kdcli.students.model_file import save_model

    pre = Preprocessing(255.0, 0.1307, 0.3081, [28, 28], "pixel values 0-255")
    arch = Architecture.parse("mlp:8")
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    save_model(path, build_model(arch, pre, 10).eval(), arch, pre, 10,
               {"command": "train", "data": "mnist:train"})
    return path


@pytest.fixture(scope="module")
def ts_teacher(tmp_path_factory) -> Path:
    from conftest import TinyMLP

    p = tmp_path_factory.mktemp("ts") / "teacher.ts"
    torch.jit.save(torch.jit.script(TinyMLP().eval()), str(p))
    return p


# --------------------------------------------------------------- memory bombs

def test_export_batch_bomb_is_refused_before_allocation(tmp_path, cli, tiny_model):
    out = tmp_path / "m.onnx"
    line = one_line_error(cli("export", out, "--model", tiny_model, "--batch", "1000000000000"))
    assert "--batch 1000000000000" in line and "memory" in line and "Lower --batch" in line
    assert not out.exists()


@pytest.mark.parametrize("edit", [
    {"num_hidden_layers": 100_000, "hidden_size": 768, "intermediate_size": 3072},
    {"hidden_size": 10_000_000},
    {"image_size": 10_000_000},
    "crop_size",
])
def test_hf_config_bombs_are_refused_before_the_model_is_built(tmp_path, cli, monkeypatch,
                                                               tiny_vit_folder, edit):
    transformers = pytest.importorskip("transformers")
    folder = tiny_vit_folder(tmp_path / "vit")
    if edit == "crop_size":
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "do_center_crop": True, "crop_size": {"height": 300_000, "width": 300_000}}))
    else:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **edit}))

    def never(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", never)
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), np.uint8))
    line = one_line_error(cli("soft-targets", folder, "--data", tmp_path / "x.npy",
                              "--out", tmp_path / "t.safetensors"))
    assert "config.json describes" in line and "memory" in line, line
    assert "nothing was allocated" in line


def _onnx_identity(path: Path, dims: list) -> Path:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]),
         helper.make_node("Slice", ["f", "s", "e", "a"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 3])],
        [helper.make_tensor("s", TensorProto.INT64, [1], [0]),
         helper.make_tensor("e", TensorProto.INT64, [1], [3]),
         helper.make_tensor("a", TensorProto.INT64, [1], [1])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_onnx_fixed_batch_of_fifty_million_is_refused(tmp_path, cli):
    model = _onnx_identity(tmp_path / "big.onnx", [50_000_000, 784])
    np.save(tmp_path / "x.npy", np.zeros((4, 784), np.float32))
    line = one_line_error(cli("soft-targets", model, "--data", tmp_path / "x.npy",
                              "--out", tmp_path / "t.safetensors"))
    assert "50,000,000" in line and "memory" in line
    assert "batches of 50,000,000" in line


def _set_metadata(path: Path, **fields: str) -> None:
    """Rewrite a safetensors file's ``__metadata__`` in place (its data section unchanged)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"].update(fields)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def test_top_k_set_claiming_billions_of_classes_is_refused(tmp_path, cli, ts_teacher):
    from kdcli.soft_targets import soft_targets
    from kdcli.transfer.reader import load_transfer_set

    ts = tmp_path / "t.safetensors"
    soft_targets([ts_teacher], T=2.0, data="mnist[:64]", out=ts, top_k=3)
    _set_metadata(ts, num_classes=str(300_000_000_000))
    with pytest.raises(ResourceError) as e:
        load_transfer_set(ts)
    assert "300,000,000,000 classes" in str(e.value)
    line = one_line_error(cli("train-student", "--transfer", ts, "--arch", "mlp:8", "--epochs", "1",
                              "--out", tmp_path / "s.safetensors"))
    assert "300,000,000,000 classes" in line and "memory" in line


def _png_folder(root: Path, n: int = 2) -> Path:
    from PIL import Image

    for k in range(2):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((6, 6), 40 * i + k, np.uint8)).save(root / f"c{k}/{i}.png")
    return root


def _cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if p.is_file())


def test_huge_image_size_is_refused_before_any_file_is_made(tmp_path, cli, image_cache):
    folder = _png_folder(tmp_path / "png")
    line = one_line_error(cli("train", "--data", folder, "--image-size", "100000,100000",
                              "--arch", "mlp:4", "--epochs", "1", "--eval-data", "none",
                              "--out", tmp_path / "m.safetensors"))
    assert "100000x100000" in line and "Lower --image-size" in line
    assert _cache_files(image_cache) == []


# --------------------------------------------------------------- absurd counts

@pytest.mark.parametrize("args", [
    ["train", "--data", "mnist[:10]", "--epochs", "9223372036854775808"],
    ["train", "--data", "mnist[:10]", "--epochs", "1000000000"],
    ["soft-targets", "T.pt", "--copies", "1000000000", "--jitter", "1"],
])
def test_absurd_counts_are_refused(tmp_path, cli, args):
    r = cli(*args, "--out", tmp_path / "o.safetensors")
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code in (1, 2) and len(lines) == 1 and lines[0].startswith("Error:"), r.output
    assert "at most 1,000,000" in lines[0] or "range" in lines[0], lines[0]


def test_copies_that_cannot_fit_on_the_disk_are_refused(tmp_path, cli, ts_teacher):
    line = one_line_error(cli("soft-targets", ts_teacher, "--scale", "255",
                              "--data", "mnist[:1000]", "--copies", "1000000", "--jitter", "1",
                              "--out", tmp_path / "t.safetensors"))
    assert "no space left" in line and "1,000,001,000 rows" in line and "--copies" in line
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------- signals

def _start(args: list, cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdcli", *map(str, args)], cwd=cwd,
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(cond, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not cond() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert cond(), proc.communicate()


def _one_line_stop(proc: subprocess.Popen, sig: int) -> str:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_shards_are_written_is_one_line_and_leaves_nothing(tmp_path, ts_teacher,
                                                                        sig):
    out = tmp_path / "out"
    out.mkdir()
    proc = _start(["soft-targets", ts_teacher, "--scale", "255", "--data", "mnist[:20000]",
                   "--out", out / "t.index.json", "--shard-size", "200KB"], tmp_path)
    _wait_for(lambda: any(p.name.endswith(".tmp") for p in out.iterdir()), proc)
    line = _one_line_stop(proc, sig)
    assert ("terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted") in line
    assert list(out.iterdir()) == []


def test_a_signal_inside_an_import_is_raised_after_it_never_inside(tmp_path, monkeypatch):
    """Raised inside a library's import, the signal could be swallowed (exit 0) or leave the
    module half-imported ("module 'numpy' has no attribute 'ndarray'")."""
    from kdcli.errors import Terminated
    from kdcli.io.files import handle_signals

    (tmp_path / "kdcli_slow_import.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.3)\nDONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    imported = []
    with pytest.raises(Terminated), handle_signals():
        import kdcli_slow_import

        imported.append(kdcli_slow_import.DONE)
    assert imported == [True]
    time.sleep(0.2)  # no re-delivery is left over (this process would die of it)


def test_a_swallowed_signal_still_stops_the_command(monkeypatch):
    from kdcli.errors import Terminated
    from kdcli.io.files import handle_signals

    monkeypatch.setattr("kdcli.io.files._MAX_DEFERRALS", 0)  # raise wherever it lands
    with pytest.raises(Terminated), handle_signals():
        try:  # a library that catches everything
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except BaseException:  # noqa: BLE001, S110
            pass


# --------------------------------------------------------------- ONNX runs that never end

def _endless_loop_onnx(path: Path) -> Path:
    """A Loop with no trip count whose condition stays true: it never terminates."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["v_in"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TP.INT64, []),
         helper.make_tensor_value_info("cond_in", TP.BOOL, []),
         helper.make_tensor_value_info("v_in", TP.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("cond_out", TP.BOOL, []),
         helper.make_tensor_value_info("v_out", TP.FLOAT, ["N", 4])])
    g = helper.make_graph(
        [helper.make_node("Loop", ["", "cond", "x"], ["y"], body=body)], "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4])],
        [helper.make_tensor("cond", TP.BOOL, [], [True])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_an_onnx_loop_that_never_ends_is_stopped_at_the_time_limit(tmp_path, cli, monkeypatch):
    model = _endless_loop_onnx(tmp_path / "loop.onnx")
    np.save(tmp_path / "x.npy", np.zeros((4, 4), np.float32))
    monkeypatch.setenv("KDCLI_ONNX_TIMEOUT", "0.5")
    start = time.time()
    line = one_line_error(cli("soft-targets", model, "--data", tmp_path / "x.npy",
                              "--out", tmp_path / "t.safetensors"))
    assert time.time() - start < 30
    assert "longer than 0.5 s" in line and "KDCLI_ONNX_TIMEOUT" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.onnx", "x.npy"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_endless_onnx_run_stops_on_a_signal(tmp_path, sig):
    model = _endless_loop_onnx(tmp_path / "loop.onnx")
    script = ("import sys, numpy as np\n"
              "from kdcli.io.files import handle_signals\n"
              "from kdcli.teachers.onnx_session import open_session, run_session\n"
              "sess, _ = open_session(sys.argv[1])\n"
              "try:\n"
              "    with handle_signals():\n"
              "        print('running', flush=True)\n"
              "        run_session(sess, None, {'x': np.zeros((2, 4), np.float32)}, 'm')\n"
              "except KeyboardInterrupt as e:\n"
              "    print(type(e).__name__, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(model)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "running"
    time.sleep(0.3)  # inside onnxruntime's run
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.strip() == ("Terminated" if sig == signal.SIGTERM else "KeyboardInterrupt"), err


# --------------------------------------------------------------- files that change under a run

def test_a_transfer_set_truncated_while_in_use_is_an_error_not_sigbus(tmp_path, ts_teacher):
    from kdcli.soft_targets import soft_targets

    ts = tmp_path / "t.safetensors"
    soft_targets([ts_teacher], T=2.0, data="mnist[:2000]", out=ts)
    script = ("import os, sys, torch\n"
              "from kdcli.errors import FormatError\n"
              "from kdcli.transfer.reader import load_transfer_set\n"
              "ts = load_transfer_set(sys.argv[1])\n"
              "x = ts.columns['inputs']\n"
              "assert not ts.budget.paged\n"  # read through the memory map
              "x[torch.arange(10)]\n"
              "os.truncate(sys.argv[1], os.path.getsize(sys.argv[1]) // 3)\n"
              "try:\n"
              "    x[torch.arange(1900, 2000)].sum()\n"
              "except FormatError as e:\n"
              "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", script, str(ts)], env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr)  # -7: SIGBUS
    assert "shrank from" in r.stdout and "while in use" in r.stdout


# --------------------------------------------------------------- the image cache

def _train_dry(cli, folder: Path, out: Path):
    return cli("train", "--data", folder, "--arch", "mlp:4", "--dry-run", "--eval-data", "none",
               "--out", out)


def test_stale_cache_temporaries_of_dead_processes_are_removed(tmp_path, cli, image_cache):
    from kdcli.io.files import _host

    folder = _png_folder(tmp_path / "png")
    assert _train_dry(cli, folder, tmp_path / "m.safetensors").exit_code == 0
    (entry,) = (image_cache / "images").iterdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = entry / f".inputs.npy.{_host()}.{dead}.tmp"  # a decode killed by SIGKILL
    stale.write_bytes(b"x" * 100)
    (entry / "manifest.json").unlink()  # decode again
    assert _train_dry(cli, folder, tmp_path / "m.safetensors").exit_code == 0
    assert _cache_files(image_cache) == ["inputs.npy", "manifest.json"]


def test_a_cache_entry_that_is_a_folder_leaves_no_temporary(tmp_path, cli, image_cache):
    folder = _png_folder(tmp_path / "png")
    assert _train_dry(cli, folder, tmp_path / "m.safetensors").exit_code == 0
    (entry,) = (image_cache / "images").iterdir()
    for name in ("inputs.npy", "manifest.json"):
        (entry / name).unlink()
        (entry / name).mkdir()
        (entry / name / "x").write_text("planted")
    r = _train_dry(cli, folder, tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    assert _cache_files(image_cache) == ["x", "x"]  # the planted files, and no temporary


def test_image_cache_on_a_full_disk_is_not_a_sigbus(tmp_path, small_disk):
    from PIL import Image

    folder = tmp_path / "png"
    rng = np.random.default_rng(0)
    for i in range(30):  # 30 x 3 x 64 x 64 bytes: 369 KB, more than the 256 KiB disk
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(
            folder / f"c{i % 2}" / f"{i}.png")
    r = subprocess.run([sys.executable, "-m", "kdcli", "train", "--data", str(folder),
                        "--arch", "mlp:4", "--dry-run", "--eval-data", "none",
                        "--out", str(tmp_path / "m.safetensors")], cwd=tmp_path,
                       env=_env(KDCLI_CACHE=str(small_disk)), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr)  # -7 or 135: SIGBUS
    assert [p for p in small_disk.rglob("*") if p.is_file()] == []  # decoded into memory


# --------------------------------------------------------------- temporaries

def test_a_killed_sharded_write_leaves_nothing_after_the_next_run(tmp_path, ts_teacher, cli):
    out = tmp_path / "out"
    out.mkdir()
    args = ["soft-targets", ts_teacher, "--scale", "255", "--data", "mnist[:6000]",
            "--out", out / "t.index.json", "--shard-size", "40KB"]
    proc = _start(args, tmp_path)
    _wait_for(lambda: sum(p.name.endswith(".tmp") for p in out.iterdir()) > 3, proc)
    proc.kill()
    proc.communicate()
    assert any(p.name.endswith(".tmp") for p in out.iterdir())
    args[5], args[-1] = "mnist[:300]", "400KB"  # another shard count
    r = cli(*args)
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.endswith(".tmp")] == [], names
    assert "t.index.json" in names


def test_a_data_file_truncated_during_soft_targets_is_an_error_not_sigbus(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(4000 * 784, dtype=np.float32).reshape(4000, 784))
    script = ("import os, sys\n"
              "from kdcli.data.augment import AugmentConfig\n"
              "from kdcli.data.text_augment import TextAugment\n"
              "from kdcli.errors import FormatError\n"
              "from kdcli.soft_targets import _read\n"
              "src = _read(sys.argv[1], None, None, None, None, 0, "
              "(AugmentConfig(), TextAugment()), 0)\n"
              "assert src.budget.files\n"  # memory-mapped
              "src.rows(0, 10)\n"
              "os.truncate(sys.argv[1], 4096)\n"
              "try:\n"
              "    src.rows(3900, 4000)[0].sum()\n"
              "except FormatError as e:\n"
              "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.npy")], env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr)  # -7: SIGBUS
    assert "shrank from" in r.stdout


@pytest.mark.parametrize("value, expected", [("1000", 1000), ("inf", None), ("-5", None),
                                             ("0", None), ("nan", None), ("lots", None)])
def test_memory_limit_override_takes_only_a_positive_finite_size(monkeypatch, value,
                                                                 expected):
    from kdcli.resources import available_memory

    monkeypatch.setenv("KDCLI_MEMORY_LIMIT", value)
    got = available_memory()  # no error; a bad value falls back to the system's figure
    assert got == expected if expected is not None else (got is None or got > 2**20)
