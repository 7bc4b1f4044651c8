"""The user's own data: tables, image folders, class names and per-channel/per-feature
standardization, through the library and the CLI."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kdcli.data import images as images
from kdcli.data.base import DataOptions
from kdcli.data.sources import load_data
from kdcli.errors import DataError, UsageError
from kdcli.modalities import fit_preprocessing, normalize_by
from kdcli.output import Reporter
from kdcli.preprocessing import stats_shape
from kdcli.soft_targets import soft_targets
from kdcli.students.base import Architecture, build_model
from kdcli.students.model_file import load_model
from kdcli.train import TrainConfig, train, train_student

QUIET = Reporter("quiet")


# --- fixtures: real MNIST digits written as the user would have them -----------------------

def write_png_tree(root: Path, x: np.ndarray, y: list[int], names: list[str] | None = None,
                   start: int = 0) -> Path:
    """``root/CLASS/NNNNN.png``, numbered across classes like common MNIST-PNG dumps."""
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = root / (names[label] if names else str(label))
        d.mkdir(parents=True, exist_ok=True)
        arr = img if img.ndim == 2 else img.transpose(1, 2, 0)
        Image.fromarray(arr).save(d / f"{start + i:05d}.png")
    return root


def write_kaggle_csv(path: Path, x: np.ndarray, y: list[int] | None) -> Path:
    """Kaggle's MNIST layout: ``label,pixel0,...,pixel783``."""
    flat = x.reshape(len(x), -1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow((["label"] if y is not None else []) + [f"pixel{i}" for i in range(784)])
        for i, row in enumerate(flat):
            w.writerow(([y[i]] if y is not None else []) + row.tolist())
    return path


def colour_digits(spec: str, seed: int) -> tuple[np.ndarray, list[int]]:
    """MNIST digits drawn in a random bright colour on a random dark background,
    uint8 ``[N, 3, 28, 28]``."""
    d = load_data(spec)
    g = np.random.default_rng(seed)
    n = len(d)
    fg = g.integers(140, 256, (n, 3, 1, 1))
    bg = g.integers(0, 100, (n, 3, 1, 1)) * np.array([1.0, 0.5, 0.2]).reshape(1, 3, 1, 1)
    a = d.inputs.numpy()[:, None].astype(np.float64) / 255.0
    return np.round(a * fg + (1 - a) * bg).astype(np.uint8), d.labels.tolist()


@pytest.fixture(scope="module")
def mnist600() -> tuple[np.ndarray, list[int]]:
    d = load_data("mnist:train[:600]")
    return d.inputs.numpy(), d.labels.tolist()


def write_wine(folder: Path) -> tuple[Path, Path, list[str]]:
    """scikit-learn's wine table as train/test CSVs (60/40, stratified), label last."""
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    d = load_wine()
    names = [n.replace("/", "_") for n in d.feature_names]
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.4, random_state=0,
                                          stratify=d.target)
    paths = []
    for part, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        p = folder / f"wine-{part}.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*names, "label"])
            w.writerows([*map(repr, map(float, row)), int(lab)]
                        for row, lab in zip(x, y, strict=True))
        paths.append(p)
    return paths[0], paths[1], names


# --- MNIST as a PNG tree and as a Kaggle CSV: the same transfer set and student -------------

def test_png_tree_and_kaggle_csv_give_mnists_transfer_set_and_student(tmp_path, teacher_file,
                                                                       mnist600):
    x, y = mnist600
    specs = {"mnist": "mnist:train[:600]",
             "png": str(write_png_tree(tmp_path / "png", x, y)),
             "csv": str(write_kaggle_csv(tmp_path / "train.csv", x, y))}
    sets, students = {}, {}
    for name, spec in specs.items():
        out = tmp_path / f"{name}.safetensors"
        soft_targets([teacher_file], T=20.0, data=spec, out=out)
        sets[name] = load_file(str(out))
        student = tmp_path / f"student-{name}.safetensors"
        train_student(out, arch=Architecture.parse("mlp:32"), out=student, eval_data="none",
                      config=TrainConfig(epochs=2, lr=0.05, warmup=1.0), reporter=QUIET)
        students[name] = load_file(str(student))
    assert set(sets["png"]) == set(sets["mnist"]) >= {"inputs", "labels", "logits",
                                                      "soft_targets"}
    for name in ("png", "csv"):
        for k, v in sets["mnist"].items():
            assert torch.equal(sets[name][k], v), (name, k)
        for k, v in students["mnist"].items():
            assert torch.equal(students[name][k], v), (name, k)  # bit-identical weights
    assert sets["png"]["inputs"].dtype == torch.uint8 and sets["png"]["inputs"].shape[1:] == (
        28, 28)
    assert load_model(tmp_path / "student-png.safetensors").class_names == [
        str(k) for k in range(10)]


# --- a colour-image path end to end ----------------------------------------------------------

def test_colour_folder_end_to_end_with_per_channel_statistics_in_onnx(cli, tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    names = sorted(digits)  # class i is the i-th folder name, as in torchvision
    xtr, ytr = colour_digits("mnist:train[:600]", seed=1)
    xte, yte = colour_digits("mnist:test[:100]", seed=2)
    write_png_tree(tmp_path / "train", xtr, ytr, digits)
    write_png_tree(tmp_path / "test", xte, yte, digits)
    assert load_data(str(tmp_path / "train")).inputs.shape == (600, 3, 28, 28)

    r = cli("train", "--data", "train", "--eval-data", "test", "--hidden", 64, "--layers", 1,
            "--epochs", 6, "--batch-size", 32, "--out", "teacher.safetensors", "--json")
    assert r.exit_code == 0, r.output
    teacher_errors = json.loads(r.stdout)["test_errors"]
    assert teacher_errors < 40, teacher_errors  # of 100 (measured 23); chance is 90
    r = cli("soft-targets", "teacher.safetensors", "--data", "train", "--T", 4,
            "--out", "transfer.safetensors", "--json")
    assert r.exit_code == 0, r.output
    r = cli("train-student", "--transfer", "transfer.safetensors", "--hidden", 32,
            "--layers", 1, "--epochs", 6, "--batch-size", 32, "--lr", 0.02,
            "--eval-data", "test", "--out", "student.safetensors", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["test_errors"] < 40  # measured 19
    r = cli("export", "student.onnx", "--model", "student.safetensors", "--data", "test",
            "--json")  # a recorded path is opened only when named again
    assert r.exit_code == 0, r.output
    r = cli("eval", "teacher.safetensors", "student.onnx", "--data", "test", "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["class_names"] == names and ev["models"][0]["errors"] == teacher_errors
    assert ev["models"][1]["params"] == 28 * 28 * 3 * 32 + 32 + 32 * 10 + 10

    mf = load_model(tmp_path / "student.safetensors")
    pre = mf.preprocessing
    assert isinstance(pre.mean, list) and len(pre.mean) == 3 and len(pre.std) == 3
    assert pre.mean[0] > pre.mean[2]  # the backgrounds differ by channel
    assert mf.metadata["format_version"] == "2" and mf.class_names == names
    proto = onnx.load(str(tmp_path / "student.onnx"))
    consts = [numpy_helper.to_array(i) for i in proto.graph.initializer]
    consts += [numpy_helper.to_array(a.t) for n in proto.graph.node for a in n.attribute
               if a.type == onnx.AttributeProto.TENSOR]
    for stats in (pre.mean, pre.std):
        want = np.array(stats, dtype=np.float32)
        assert any(c.size == 3 and np.array_equal(c.reshape(-1), want) for c in consts), stats
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == names
    raw = torch.from_numpy(xte[:50]).float()  # raw 0-255 values: preprocessing is inside
    sess = ort.InferenceSession(str(tmp_path / "student.onnx"),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": raw.numpy()})[0]
    with torch.inference_mode():
        ref = mf.model(raw).numpy()
    assert np.abs(got - ref).max() < 1e-4
    r = cli("inspect", "student.safetensors", "--json")
    assert json.loads(r.stdout)["class_names"] == names


# --- tables ----------------------------------------------------------------------------------

def test_wine_csv_and_parquet_standardize_per_feature_and_beat_scalar(tmp_path):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    train_csv, test_csv, names = write_wine(tmp_path)
    pq.write_table(pcsv.read_csv(train_csv), tmp_path / "wine-train.parquet")
    a, b = load_data(str(train_csv)), load_data(str(tmp_path / "wine-train.parquet"))
    assert a.inputs.shape == (106, 13) and a.inputs.dtype == torch.float32
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert a.feature_names == b.feature_names == names and a.class_names is None

    errors = {}
    for rule in ("auto", "scalar"):
        out = tmp_path / f"{rule}.safetensors"
        s = train(str(tmp_path / "wine-train.parquet"), arch=Architecture.parse("mlp:64,64"),
                  out=out, eval_data=str(test_csv), reporter=QUIET,
                  config=TrainConfig(normalize_by=rule))
        errors[rule] = s["test_errors"]
    # Measured: 2 errors of 72 at the defaults (per feature), 22 with one scalar mean/std.
    assert errors["auto"] <= 4 and errors["scalar"] >= 12, errors
    mf = load_model(tmp_path / "auto.safetensors")
    assert len(mf.preprocessing.mean) == 13 and mf.feature_names == names
    assert isinstance(load_model(tmp_path / "scalar.safetensors").preprocessing.mean, float)


def test_breast_cancer_at_the_defaults(tmp_path):
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    d = load_breast_cancer()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.4, random_state=0,
                                          stratify=d.target)
    names = ["benign" if k else "malignant" for k in range(2)]
    for part, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        with open(tmp_path / f"{part}.tsv", "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["diagnosis", *(n.replace(" ", "_") for n in d.feature_names)])
            w.writerows([names[lab], *map(float, row)] for row, lab in zip(x, y, strict=True))
    opts = DataOptions(label_column="diagnosis")
    ds = load_data(str(tmp_path / "train.tsv"), options=opts)
    assert ds.class_names == ["benign", "malignant"] and ds.inputs.shape == (341, 30)
    # The string labels sort as the class names: benign is 0 here (it is 1 in sklearn).
    assert torch.equal(ds.labels, torch.from_numpy(1 - ytr))
    s = train(str(tmp_path / "train.tsv"), arch=Architecture.parse("mlp:64,64"),
              out=tmp_path / "m.safetensors", eval_data=str(tmp_path / "test.tsv"),
              data_options=opts, reporter=QUIET)
    assert s["test_errors"] <= 12  # measured 8 of 228; a scalar mean/std gives 19


def test_feature_and_label_columns_and_unlabelled_tables(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("id,name,a,b,label\n1,x,0.5,1,2\n2,y,1.5,1,0\n3,z,2.5,1,1\n")
    d = load_data(str(p))
    assert d.feature_names == ["id", "name", "a", "b"] and d.labels.tolist() == [2, 0, 1]
    assert d.categories == {"name": ["x", "y", "z"]}
    d = load_data(str(p), options=DataOptions(feature_columns=("b", "a")))
    assert d.inputs.tolist() == [[1, 0.5], [1, 1.5], [1, 2.5]]
    d = load_data(f"{p}[1:]", options=DataOptions(label_column="none"))
    assert d.labels is None and len(d) == 2 and "label" in d.feature_names
    # A constant feature (b) gets std 1, not inf.
    pre = fit_preprocessing(load_data(str(p), options=DataOptions(
        feature_columns=("id", "a", "b"))).inputs)
    assert pre.std[2] == 1.0 and all(np.isfinite(pre.mean + pre.std))


# --- image folders ---------------------------------------------------------------------------

def test_flat_folder_is_unlabelled_and_takes_the_teachers_class_names(tmp_path, mnist600):
    x, y = mnist600
    names = [f"digit{k}" for k in range(10)]
    write_png_tree(tmp_path / "train", x[:300], y[:300], names)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(300, 400):
        Image.fromarray(x[i]).save(flat / f"{i}.png")
    teacher = tmp_path / "teacher.safetensors"
    train(str(tmp_path / "train"), arch=Architecture.parse("mlp:16"), out=teacher,
          config=TrainConfig(epochs=1), reporter=QUIET)
    d = load_data(f"{flat}[10:20]")
    assert d.labels is None and d.class_names is None
    assert torch.equal(d.inputs, torch.from_numpy(x[310:320]))
    soft_targets([teacher], T=2.0, data=str(flat), out=tmp_path / "t.safetensors")
    from kdcli.transfer.reader import load_transfer_set

    ts = load_transfer_set(tmp_path / "t.safetensors")
    assert ts.meta["class_names"] == names and not ts.has_labels


def test_image_size_channels_and_natural_order(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(d / "10.png")
    Image.new("L", (4, 4), 128).save(d / "2.jpg")
    Image.new("RGB", (5, 5), (0, 0, 255)).save(d / "1.bmp")
    Image.new("RGB", (5, 5), (0, 255, 0)).save(d / "3.webp", lossless=True)
    (d / "notes.txt").write_text("ignored")
    with pytest.raises(DataError, match="differ in size"):
        load_data(str(d))
    rgb = load_data(str(d), options=DataOptions(image_size=(4, 6)))
    assert rgb.inputs.shape == (4, 3, 4, 6) and rgb.inputs.dtype == torch.uint8
    # 1.bmp, 2.jpg, 3.webp, 10.png: numbers in names compare as numbers
    assert rgb.inputs[:, :, 0, 0].tolist() == [[0, 0, 255], [128] * 3, [0, 255, 0], [255, 0, 0]]
    gray = load_data(str(d), options=DataOptions(image_size=(4, 6), channels=1))
    assert gray.inputs.shape == (4, 4, 6) and int(gray.inputs[1, 0, 0]) == 128


def test_the_cache_is_read_back_and_invalidated_by_a_touched_or_renamed_file(
        tmp_path, monkeypatch, mnist600, image_cache):
    x, y = mnist600
    root = write_png_tree(tmp_path / "png", x[:40], y[:40])
    decodes = []
    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda *a: decodes.append(a[0]) or real(*a))
    first = load_data(str(root))
    assert len(decodes) == 40
    second = load_data(str(root))
    # memory-mapped from the cache, after decoding its first, middle and last image to check it
    assert len(decodes) == 43 and second.files
    assert torch.equal(first.inputs, second.inputs)
    assert list(image_cache.glob("images/*/inputs.npy"))
    assert not [p for p in root.rglob("*") if p.suffix not in (".png", "")]  # nothing added
    some = next(root.rglob("*.png"))
    st = some.stat()
    os.utime(some, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_data(str(root))
    assert len(decodes) == 83
    load_data(str(root))
    assert len(decodes) == 86
    some.rename(some.with_name("renamed.png"))
    load_data(str(root))
    assert len(decodes) == 126


def test_a_link_out_of_the_folder_is_refused(tmp_path, mnist600):
    x, y = mnist600
    root = write_png_tree(tmp_path / "imgs", x[:4], [0, 1, 0, 1])
    secret = tmp_path / "secret.png"
    Image.fromarray(x[5]).save(secret)  # a file the user did not name
    (root / "1" / "00009.png").symlink_to(secret)
    with pytest.raises(DataError, match="outside"):
        load_data(str(root))


# --- bad input: one line naming the file or column, exit 1, nothing written -----------------

def bad_inputs(tmp_path: Path, mnist600) -> dict[str, tuple[list[str], str]]:
    x, y = mnist600
    cases: dict[str, tuple[list[str], str]] = {}
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,0\n3,4,1\n")
    cases["missing label column"] = (["--data", "t.csv", "--label-column", "kind"], "'kind'")
    (tmp_path / "text.csv").write_text("a,b,label\n1,2,0\n3,oops,1\n"
                                       + "".join(f"{i},{i},0\n" for i in range(10)))
    cases["non-numeric"] = (["--data", "text.csv"],
                            "'b' of text.csv is not numeric: 'oops' in row 2")
    (tmp_path / "gap.csv").write_text("a,b,label\n1,2,0\n3,,1\n")
    cases["missing value"] = (["--data", "gap.csv", "--missing", "error"],
                              "'b' of gap.csv has a missing value in row 2")
    (tmp_path / "ragged.csv").write_text("a,b,label\n1,2,0\n3,1\n5,6,1\n")
    cases["ragged row"] = (["--data", "ragged.csv"], "ragged.csv line 3 has 2 fields")
    (tmp_path / "empty").mkdir()
    cases["empty folder"] = (["--data", "empty"], "empty holds no images")
    mixed = tmp_path / "mixed" / "a"
    mixed.mkdir(parents=True)
    Image.new("L", (28, 28)).save(mixed / "1.png")
    Image.new("L", (32, 28)).save(mixed / "2.png")
    cases["mixed sizes"] = (["--data", "mixed"], "1.png is 28x28")
    broken = tmp_path / "broken" / "a"
    write_png_tree(tmp_path / "broken", x[:3], [0, 0, 0], ["a"])
    (broken / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cases["unreadable image"] = (["--data", "broken"], "00001.png")
    write_png_tree(tmp_path / "tr", x[:20], [k % 3 for k in range(20)], ["cat", "dog", "owl"])
    # a class the training data lacks (a test set lacking one of its classes is evaluated)
    write_png_tree(tmp_path / "te", x[20:30], [k % 2 for k in range(10)], ["cat", "emu"])
    cases["classes differ"] = (["--data", "tr", "--eval-data", "te"], "classes differ")
    return cases


def test_bad_input_is_one_line_naming_it_exit_1_and_nothing_written(cli, tmp_path, mnist600):
    cases = bad_inputs(tmp_path, mnist600)
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, (args, expect) in cases.items():
        r = cli("train", *args, "--epochs", 1, "--out", "m.safetensors")
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.exit_code == 1, (name, r.output)
        assert len(lines) == 1 and lines[0].startswith("Error: "), (name, r.stderr)
        assert expect in lines[0], (name, lines[0])
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name


def test_options_reach_every_command(cli, tmp_path):
    # A bad --image-size is refused by each command that reads data, before it reads any.
    for cmd in (["train"], ["eval", "m.safetensors"], ["soft-targets", "m.safetensors"],
                ["train-student"], ["calibrate-bias"], ["sweep", "m.safetensors"],
                ["export", "x.onnx"]):
        r = cli(*cmd, "--image-size", "0,4")
        assert r.exit_code != 0 and "--image-size" in r.stderr, (cmd, r.output)


# --- the normalization rule and teacher statistics -------------------------------------------

def test_normalize_by_rule_and_stats_shapes():
    assert normalize_by("auto", [13]) == "feature"
    assert normalize_by("auto", [3, 32, 32]) == "channel"
    assert normalize_by("auto", [28, 28]) == "scalar"
    with pytest.raises(UsageError, match="channel"):
        normalize_by("channel", [28, 28])
    assert stats_shape(3, [3, 8, 8]) == [3, 1, 1] and stats_shape(13, [13]) == [13]
    assert stats_shape(1, [13]) == []
    with pytest.raises(UsageError):
        stats_shape(4, [3, 8, 8])
    x = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    pre = fit_preprocessing(x)
    want = (x.double() / 255).transpose(0, 1).reshape(3, -1)
    assert np.allclose(pre.mean, want.mean(1).numpy(), atol=1e-6)
    assert np.allclose(pre.std, want.std(1, correction=0).numpy(), atol=1e-6)
    model = build_model(Architecture.parse("mlp:4"), pre, 2)
    assert not any("raw_" in k for k in model.state_dict())  # the stats live in metadata
    feat = fit_preprocessing(x, by="feature")
    assert len(feat.mean) == 48
    out = build_model(Architecture.parse("mlp:4"), feat, 2)(x)
    assert torch.isfinite(out).all()


def test_teacher_mean_and_std_per_channel(tmp_path):
    from kdcli.teachers.base import TeacherOptions
    from kdcli.teachers.formats import load_teacher

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)).eval()
    path = tmp_path / "t.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    x = torch.rand(5, 3, 4, 4) * 255
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    t = load_teacher(path, TeacherOptions(scale=255.0, mean=mean, std=std), probe=x)
    m, s = torch.tensor(mean).reshape(3, 1, 1), torch.tensor(std).reshape(3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(t.logits(x), net((x / 255 - m) / s), atol=1e-5)


def test_a_slice_without_the_last_class_keeps_every_class_name(tmp_path):
    """Class names come from the whole table; a model trained on a slice that lacks the last
    class must still have one output per name, or its file could not be read back."""
    from kdcli.output import Reporter
    from kdcli.students.base import Architecture
    from kdcli.students.model_file import load_model
    from kdcli.train import TrainConfig, train

    rows = ["x,y,label"] + [f"{i},{i % 3},{'ab'[i % 2]}" for i in range(20)] + ["5,5,c"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "m.safetensors"
    train(f"{tmp_path / 't.csv'}[:20]", arch=Architecture.parse("mlp:8"), out=out,
          config=TrainConfig(epochs=1), eval_data="none", reporter=Reporter("quiet"))
    mf = load_model(out)
    assert mf.num_classes == 3 and mf.class_names == ["a", "b", "c"]
