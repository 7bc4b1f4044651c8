"""Files kdcli reads tell the truth or are refused; every error is one line; options are
range-checked before any work. Each broken file is built here, by hand where kdcli's own
writer would refuse to make it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdcli.errors import FormatError
from kdcli.io.storage import read_header
from kdcli.transfer.reader import load_transfer_set


def one_line_error(r, code: int = 1, *, match: str | None = None, no_file: Path | None = None):
    """Assert a CLI result is exactly one ``Error:`` line on stderr, with ``code``."""
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == code, (r.exit_code, r.stderr, r.stdout)
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "unexpected" not in r.stderr and "Traceback" not in r.stderr + r.stdout
    if match is not None:
        assert match in lines[0], lines[0]
    if no_file is not None:
        assert not no_file.exists() and not list(no_file.parent.glob(f".{no_file.name}*"))
    return lines[0]


def write_raw(path: Path, header: bytes | dict, data: bytes = b"") -> Path:
    """A safetensors-like file from a raw header (bytes or a JSON-able dict) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def old_meta(path: Path) -> dict[str, str]:
    """A transfer set's metadata as another writer would copy it: version 2, no checksum."""
    meta = read_header(path).metadata
    return {**{k: v for k, v in meta.items() if k != "data_sha256"}, "format_version": "2"}


@pytest.fixture(scope="module")
def parts(transfer_file):
    return load_file(str(transfer_file)), old_meta(transfer_file)


def rewrite(tmp_path: Path, parts, name: str, tensors=None, meta=None) -> Path:
    t, m = parts
    p = tmp_path / f"{name}.safetensors"
    full = {k: v for k, v in {**t, **(tensors or {})}.items() if v is not None}
    save_file(full, str(p), metadata={**m, **(meta or {})})
    return p


def train_on(cli, transfer: Path, *extra: str):
    return cli("train-student", "--transfer", transfer, "--out", "s.safetensors", "--epochs",
               "1", "--eval-data", "none", "--hidden", "8", *extra)


# --------------------------------------------------------------------------- transfer sets

TRANSFER_CASES = {
    "rows sum to 3": (lambda t: {"soft_targets": t["soft_targets"] * 3}, {},
                      "do not sum to 1"),
    "negative targets": (lambda t: {"soft_targets": t["soft_targets"].index_fill(
        0, torch.tensor([3]), -0.1)}, {}, "negative soft targets (rows [3])"),
    "int32 soft targets": (lambda t: {"soft_targets": t["soft_targets"].to(torch.int32)}, {},
                           "soft_targets as int32"),
    "float labels": (lambda t: {"labels": t["labels"].float()}, {}, "labels as float32"),
    "labels out of range": (lambda t: {"labels": t["labels"].index_fill(
        0, torch.tensor([5]), 12)}, {}, "labels outside [0, 10) (rows [5])"),
    "wrong T": (lambda t: {}, {"T": "8.0"}, "not softmax(logits / T) at the recorded T=8"),
    "wrong class count": (lambda t: {}, {"num_classes": "12"}, "num_classes=12"),
    "wrong example count": (lambda t: {}, {"num_examples": "1999"}, "num_examples=1999"),
    "two weights, one teacher": (lambda t: {}, {"weights": "[0.5, 0.5]"},
                                 "different member counts"),
    "weights not summing to 1": (lambda t: {}, {"weights": "[3.0]"}, "do not sum to 1"),
    "bad combine": (lambda t: {}, {"combine": "median"}, "unknown combine rule 'median'"),
    "wrong inputs_sha256": (lambda t: {}, {"inputs_sha256": "0" * 64}, "inputs_sha256"),
    "metadata nested deeply": (lambda t: {}, {"teachers": "[" * 100_000 + "]" * 100_000},
                               "bad or missing metadata"),
}


@pytest.mark.parametrize("case", list(TRANSFER_CASES))
def test_lying_transfer_sets_are_refused_before_training(cli, tmp_path, parts, case):
    tchange, mchange, match = TRANSFER_CASES[case]
    bad = rewrite(tmp_path, parts, "bad", tchange(parts[0]), mchange)
    line = one_line_error(train_on(cli, bad), match=match, no_file=tmp_path / "s.safetensors")
    assert "--combine" not in line and "Lower --lr" not in line


def topk_parts(parts):
    t, m = parts
    vals, idx = t["logits"].topk(3, -1)
    p = t["soft_targets"].gather(-1, idx).double().sum(-1)
    tensors = {"inputs": t["inputs"], "labels": t["labels"], "topk_logits": vals,
               "topk_indices": idx.to(torch.int32), "tail_logmass": (1 - p).log().float()}
    return tensors, {**m, "targets": "top-k", "top_k": "3"}


def test_top_k_indices_must_be_distinct_and_in_range(cli, tmp_path, parts):
    tensors, meta = topk_parts(parts)
    good = tmp_path / "good.safetensors"
    save_file(tensors, str(good), metadata=meta)
    assert load_transfer_set(good).top_k == 3  # the hand-made set itself is valid
    for name, change, match in (
            ("dup", lambda i: i.index_fill(1, torch.tensor([1]), 0).index_fill(
                1, torch.tensor([0]), 0), "duplicate top-k indices"),
            ("range", lambda i: i.index_fill(0, torch.tensor([7]), 10), "outside [0, 10)"),
            ("negative", lambda i: i.index_fill(0, torch.tensor([7]), -1), "outside [0, 10)")):
        p = tmp_path / f"{name}.safetensors"
        save_file({**tensors, "topk_indices": change(tensors["topk_indices"])}, str(p),
                  metadata=meta)
        one_line_error(train_on(cli, p), match=match, no_file=tmp_path / "s.safetensors")
    p = tmp_path / "k.safetensors"
    save_file(tensors, str(p), metadata={**meta, "top_k": "4"})
    one_line_error(train_on(cli, p), match="top_k=4")


def test_flipped_bytes_fail_the_checksum(cli, tmp_path, transfer_file):
    assert read_header(transfer_file).metadata["data_sha256"]
    raw = bytearray(transfer_file.read_bytes())
    start = read_header(transfer_file).data_start
    for at in (start + 10, len(raw) - 5):  # in the inputs, and in the soft targets
        bad = bytearray(raw)
        bad[at] ^= 0x01
        p = tmp_path / f"flip{at}.safetensors"
        p.write_bytes(bytes(bad))
        one_line_error(train_on(cli, p), match="fails its checksum")
        r = cli("inspect", p, "--verify")
        one_line_error(r, match="fails its checksum")
    r = cli("inspect", transfer_file, "--verify", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["verified"] is True


def test_version_3_requires_the_checksum(tmp_path, parts):
    p = rewrite(tmp_path, parts, "v3", meta={"format_version": "3"})
    with pytest.raises(FormatError, match="records no data_sha256"):
        load_transfer_set(p)


# --------------------------------------------------------------------------- the header reader

def header_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    return {
        "overlap": (write_raw(tmp_path / "overlap.st", {
            "a": f32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            bytes(12)), "overlaps another tensor"),
        "same bytes twice": (write_raw(tmp_path / "twice.st", {"a": f32, "b": f32}, bytes(8)),
                             "overlaps another tensor"),
        "gap": (write_raw(tmp_path / "gap.st", {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
            "a gap of 4 bytes"),
        "trailing": (write_raw(tmp_path / "trail.st", {"a": f32}, bytes(20)),
                     "bytes follow its last tensor"),
        "metadata list": (write_raw(tmp_path / "metalist.st", {"__metadata__": ["x"],
                                                                "a": f32}, bytes(8)),
                          "__metadata__ must be an object of strings"),
        "metadata number": (write_raw(tmp_path / "metanum.st", {"__metadata__": {"T": 4},
                                                                 "a": f32}, bytes(8)),
                            "__metadata__ must be an object of strings"),
        "deep JSON": (write_raw(tmp_path / "deep.st", b'{"a":' + b"[" * 200_000
                                + b"]" * 200_000 + b"}"), "nests JSON too deeply"),
        "header list": (write_raw(tmp_path / "list.st", b"[1, 2]      "), "not an object"),
        "bad dtype": (write_raw(tmp_path / "dtype.st", {
            "a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
            "unknown dtype"),
        "negative shape": (write_raw(tmp_path / "shape.st", {
            "a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
            "bad shape"),
        "offsets vs shape": (write_raw(tmp_path / "size.st", {
            "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
            "needs 12 bytes"),
        "float offsets": (write_raw(tmp_path / "fo.st", {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, bytes(8)),
            "bad data_offsets"),
        "past the end": (write_raw(tmp_path / "end.st", {"a": f32}, bytes(4)), "truncated"),
        "huge length": (tmp_path.joinpath("huge.st").write_bytes(
            struct.pack("<Q", 1 << 62) + b"{}") and tmp_path / "huge.st",
            "bad header length"),
    }


def test_header_reader_refuses_malformed_headers(tmp_path):
    for name, (p, match) in header_cases(tmp_path).items():
        with pytest.raises(FormatError, match=match):
            read_header(p)
        assert name


@pytest.mark.parametrize("command", ["train-student", "inspect", "eval", "export"])
def test_malformed_headers_are_one_line_for_every_reader(cli, tmp_path, command):
    for _, (p, _match) in header_cases(tmp_path).items():
        args = {"train-student": ["train-student", "--transfer", p, "--out", "o.st"],
                "inspect": ["inspect", p], "eval": ["eval", p, "--data", "mnist:test[:10]"],
                "export": ["export", "o.onnx", "--model", p]}[command]
        one_line_error(cli(*args))


def test_shard_index_fields_and_nesting(cli, tmp_path, transfer_file):
    shard = tmp_path / "one.safetensors"
    shard.write_bytes(transfer_file.read_bytes())
    good_entry = {"file": shard.name, "row_start": 0, "rows": 2000}
    meta = {**read_header(shard).metadata}
    cases = {
        "deep": '{"format": "kdcli.transfer-set.index", "shards": ' + "[" * 100_000
        + "]" * 100_000 + "}",
        "rows a string": json.dumps({"format": "kdcli.transfer-set.index", "format_version": 1,
                                     "metadata": meta, "shards": [{**good_entry,
                                                                   "rows": "2000"}]}),
        "file a list": json.dumps({"format": "kdcli.transfer-set.index", "format_version": 1,
                                   "metadata": meta, "shards": [{**good_entry, "file": []}]}),
        "entry a number": json.dumps({"format": "kdcli.transfer-set.index",
                                      "format_version": 1, "metadata": meta, "shards": [3]}),
        "metadata a list": json.dumps({"format": "kdcli.transfer-set.index",
                                       "format_version": 1, "metadata": [1],
                                       "shards": [good_entry]}),
    }
    for name, text in cases.items():
        p = tmp_path / "set.index.json"
        p.write_text(text)
        one_line_error(train_on(cli, p), match="", no_file=tmp_path / "s.safetensors")
        one_line_error(cli("inspect", p))
        assert name


# --------------------------------------------------------------------------- model files

def model_with(tmp_path: Path, teacher_file: Path, name: str, **changes: object) -> Path:
    meta = read_header(teacher_file).metadata
    meta = {**{k: v for k, v in meta.items() if k != "data_sha256"}, "format_version": "1"}
    for key, value in changes.items():
        sub, _, field = key.partition("__")
        doc = json.loads(meta[sub]) if field else None
        if field:
            doc[field] = value
            meta[sub] = json.dumps(doc)
        else:
            meta[key] = str(value)
    p = tmp_path / f"{name}.safetensors"
    save_file(load_file(str(teacher_file)), str(p), metadata=meta)
    return p


MODEL_CASES = {
    "negative width": ({"architecture__hidden": [-5]}, "impossible architecture"),
    "huge width": ({"architecture__hidden": [10**11]}, "impossible architecture"),
    "float width": ({"architecture__hidden": [64.5]}, "impossible architecture"),
    "dropout 1": ({"architecture__dropout": 1.0}, "impossible architecture"),
    "cnn inf": ({"architecture__family": "cnn", "architecture__width": 1e309},
                "impossible architecture"),
    "family": ({"architecture__family": "rnn"}, "impossible architecture"),
    "raw shape": ({"preprocessing__raw_shape": [28, -28]}, "impossible raw_shape"),
    "raw shape text": ({"preprocessing__raw_shape": "28x28"}, "impossible raw_shape"),
    "std 0": ({"preprocessing__std": 0.0}, "preprocessing std"),
    "classes 0": ({"num_classes": 0}, "num_classes=0"),
    "classes -3": ({"num_classes": -3}, "num_classes=-3"),
    "classes text": ({"num_classes": "ten"}, "bad kdcli.model metadata"),
    "unknown field": ({"architecture__colour": "red"}, "bad kdcli.model metadata"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_impossible_model_metadata_is_a_format_error(cli, tmp_path, teacher_file, case):
    changes, match = MODEL_CASES[case]
    p = model_with(tmp_path, teacher_file, "bad", **changes)
    for args in (("eval", p, "--data", "mnist:test[:20]"), ("inspect", p),
                 ("export", "o.onnx", "--model", p)):
        one_line_error(cli(*args), match=match, no_file=tmp_path / "o.onnx")


def test_model_weights_are_checksummed_and_must_be_finite(cli, tmp_path, teacher_file):
    raw = bytearray(teacher_file.read_bytes())
    raw[read_header(teacher_file).data_start + 100] ^= 0x10
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw))
    for args in (("eval", flipped, "--data", "mnist:test[:20]"), ("inspect", flipped),
                 ("export", "o.onnx", "--model", flipped),
                 ("soft-targets", flipped, "--data", "mnist[:20]", "--out", "t.safetensors")):
        one_line_error(cli(*args), match="fails its checksum", no_file=tmp_path / "o.onnx")
    tensors = load_file(str(teacher_file))
    tensors["1.0.weight"][3, 4] = float("nan")
    nan = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan), metadata=model_with(tmp_path, teacher_file, "m") and
              read_header(tmp_path / "m.safetensors").metadata)
    line = one_line_error(cli("export", "o.onnx", "--model", nan), match="NaN or Inf in weight",
                          no_file=tmp_path / "o.onnx")
    assert "report" not in line.lower()


def test_a_model_that_outputs_nan_fails_eval(cli, tmp_path):
    class NaNNet(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10] * float("nan")

    p = tmp_path / "nan.pt"
    torch.jit.save(torch.jit.script(NaNNet()), str(p))
    one_line_error(cli("eval", p, "--data", "mnist:test[:50]"), match="outputs NaN or Inf")


# --------------------------------------------------------------------------- options

OPTION_CASES = {
    "momentum -0.5": (["train", "--momentum", "-0.5"], "--momentum must lie in [0, 1)"),
    "momentum nan": (["train", "--momentum", "nan"], "--momentum must lie in [0, 1)"),
    "momentum 1": (["train-student", "--momentum", "1"], "--momentum must lie in [0, 1)"),
    "weight decay -1": (["train", "--weight-decay", "-1"], "--weight-decay"),
    "weight decay inf": (["train-student", "--weight-decay", "inf"], "--weight-decay"),
    "cnn inf": (["train", "--arch", "cnn:inf"], "CNN width multiplier"),
    "cnn nan": (["train", "--arch", "cnn:nan"], "CNN width multiplier"),
    "hidden huge": (["train", "--hidden", "100000000000"], "--hidden widths"),
    "arch huge": (["train-student", "--arch", "mlp:100000000000"], "--hidden widths"),
    "layers huge": (["train", "--layers", "100000"], "--layers"),
    "arch and hidden": (["train", "--arch", "mlp:8", "--hidden", "32"],
                        "--arch mlp:8 conflicts with --hidden"),
    "arch and layers": (["train-student", "--arch", "mlp:8", "--layers", "1"],
                        "conflicts with --layers"),
    "T tiny": (["soft-targets", "x.safetensors", "--T", "1e-30"], "--T must be"),
    "T huge": (["soft-targets", "x.safetensors", "--T", "1e200"], "--T must be"),
    "student T huge": (["train-student", "--T", "1e200"], "--T must be"),
    "sweep T": (["sweep", "x.safetensors", "--T", "2,1e200"], "--T must be"),
    "opset 3": (["export", "o.onnx", "--opset", "3"], "--opset must be from"),
    "opset 99": (["export", "o.onnx", "--opset", "99"], "--opset must be from"),
    "jitter image": (["train", "--data", "mnist[:50]", "--jitter", "30"],
                     "not smaller than the 28x28 images"),
    "copies jitter image": (["soft-targets", "t.safetensors", "--data", "mnist[:50]",
                             "--jitter", "28", "--copies", "1"], "not smaller than"),
    "num classes small": (["train", "--data", "mnist[:50]", "--num-classes", "3"],
                          "--num-classes 3, but the labels go up to"),
    "sweep alpha": (["sweep", "t.safetensors", "--alpha", "5"], "--alpha"),
    "sweep momentum-like lr": (["sweep", "t.safetensors", "--lr", "-1"], "--lr"),
    "sweep warmup": (["sweep", "t.safetensors", "--warmup", "99"], "--warmup"),
    "size": (["soft-targets", "t.safetensors", "--out", "s.index.json", "--shard-size",
              "infGB"], "size"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_are_range_checked_before_any_work(cli, tmp_path, teacher_file,
                                                   transfer_file, case):
    args, match = OPTION_CASES[case]
    args = [str(teacher_file) if a == "x.safetensors" else a for a in args]
    if args[0] == "train-student":
        args += ["--transfer", str(transfer_file)]
    if args[0] == "sweep":
        args += ["--out-dir", "sweepdir"]
    elif args[0] != "export" and "--out" not in args:
        args += ["--out", "out.safetensors"]
    one_line_error(cli(*args), match=match)
    assert not list(tmp_path.glob("*out.safetensors*")) and not (tmp_path / "sweepdir").exists()
    assert not (tmp_path / "o.onnx").exists()


def test_sweep_out_dir_that_is_a_file_and_other_data(cli, tmp_path, teacher_file):
    (tmp_path / "afile").write_text("x")
    one_line_error(cli("sweep", teacher_file, "--out-dir", "afile", "--T", "2",
                       "--hidden", "8", "--epochs", "1", "--data", "mnist[:300]"),
                   match="is a file")
    d = tmp_path / "sw"
    d.mkdir()
    from kdcli.soft_targets import soft_targets

    soft_targets([teacher_file], T=2.0, data="mnist[:300]", out=d / "transfer.safetensors")
    one_line_error(cli("sweep", teacher_file, "--out-dir", d, "--T", "2", "--hidden", "8",
                       "--epochs", "1", "--data", "mnist[:400]", "--eval-data", "none"),
                   match="was made from --data mnist[:300], not mnist[:400]")


def test_class_counts_the_labels_do_not_support(cli, tmp_path):
    x = torch.randint(0, 255, (60, 4, 4), dtype=torch.uint8)
    y = torch.arange(60) % 3
    y[7] = 1_000_000
    save_file({"inputs": x, "labels": y}, str(tmp_path / "d.safetensors"))
    one_line_error(cli("train", "--data", "d.safetensors", "--epochs", "1", "--hidden", "4",
                       "--eval-data", "none", "--out", "m.safetensors"),
                   match="1,000,001-class model would have 999,997 classes with no example",
                   no_file=tmp_path / "m.safetensors")
    y[7] = 12  # 13 classes, 10 of them empty: allowed
    save_file({"inputs": x, "labels": y}, str(tmp_path / "d2.safetensors"))
    r = cli("train", "--data", "d2.safetensors", "--epochs", "1", "--hidden", "4",
            "--eval-data", "none", "--out", "m2.safetensors", "--json", "--quiet")
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["classes"] if "classes" in r.stdout else True


def test_eval_data_of_another_shape_is_refused_before_training(cli, tmp_path, parts):
    t, m = parts
    small = {**t, "inputs": t["inputs"][:, :20, :20].contiguous()}
    p = tmp_path / "small.safetensors"
    teachers = [{**r, "input_shape": [20, 20]} for r in json.loads(m["teachers"])]
    save_file(small, str(p), metadata={**{k: v for k, v in m.items() if k != "inputs_sha256"},
                                       "teachers": json.dumps(teachers)})
    r = cli("train-student", "--transfer", p, "--out", "s.safetensors", "--epochs", "50",
            "--hidden", "8")
    one_line_error(r, match="has examples of shape [28, 28], but the transfer set's are [20, 20]",
                   no_file=tmp_path / "s.safetensors")


# --------------------------------------------------------------------------- the CLI itself

@pytest.mark.parametrize("args", [["train", "--bogus"], ["train", "--epochs", "x"], ["eval"],
                                  ["nosuchcommand"], ["export", "--opset"]])
def test_usage_errors_are_one_line_with_exit_2(cli, args):
    line = one_line_error(cli(*args), code=2)
    assert "--help" in line


def test_json_and_quiet_together(cli, teacher_file):
    r = cli("eval", teacher_file, "--data", "mnist:test[:100]", "--json", "--quiet")
    assert r.exit_code == 0 and r.stderr == ""
    assert json.loads(r.stdout)["models"][0]["examples"] == 100


def test_truncated_onnx_in_inspect(cli, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["input"], ["logits"])
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                             [1, 4])])
    data = helper.make_model(graph).SerializeToString()
    onnx.load_from_string(data)
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 2])
    one_line_error(cli("inspect", p))


MODEL_INPUT_OPTIONS = {"--arch", "--input-shape", "--scale", "--mean", "--std",
                       "--teacher-output", "--output", "--trust-pickle"}


def test_every_command_that_runs_a_model_takes_the_same_model_options(cli, tmp_path, tiny,
                                                                      teacher_file):
    import typer

    from kdcli.cli import app

    group = typer.main.get_command(app)
    for name in ("soft-targets", "eval", "calibrate-bias"):
        flags = {o for p in group.commands[name].params for o in p.opts}
        assert flags >= MODEL_INPUT_OPTIONS, (name, MODEL_INPUT_OPTIONS - flags)
    p = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(tiny), str(p))
    runs = [cli("eval", p, "--data", "mnist:test[:200]", "--json", *extra)
            for extra in ([], ["--scale", "255"])]
    assert all(r.exit_code == 0 for r in runs), runs[0].stderr
    nll = [json.loads(r.stdout)["models"][0]["nll"] for r in runs]
    assert nll[0] != nll[1]  # --scale reached the model
    one_line_error(cli("eval", p, p, "--data", "mnist:test[:20]", "--scale", "1", "--scale", "2",
                       "--scale", "3"), match="once per model")
    r = cli("calibrate-bias", "--model", teacher_file, "--teacher", p, "--scale", "255",
            "--data", "mnist[:300]", "--out", "c.safetensors", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["target"] == "teacher"


def test_opset_is_honoured(cli, teacher_file):
    r = cli("export", "o.onnx", "--model", teacher_file, "--data", "mnist:test[:50]",
            "--opset", "20", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["opset"] == 20
