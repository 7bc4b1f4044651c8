"""CLI conventions shared by every command."""

import json
import os
import stat
import subprocess
import sys

import pytest

from kdcli.errors import DataError, Terminated, user_message
from kdcli.io.files import atomic_output

COMMANDS = ["train", "eval", "soft-targets", "train-student", "export", "inspect"]


def test_importing_the_cli_does_not_import_torch():
    code = ("import sys, kdcli.cli; "
            "print([m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example_and_skips_torch(command):
    code = ("import sys; from typer.testing import CliRunner; from kdcli.cli import app; "
            f"r = CliRunner().invoke(app, ['{command}', '--help']); "
            "print(r.exit_code, 'torch' in sys.modules); print(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "200"})
    first, _, text = out.stdout.partition("\n")
    assert first == "0 False"
    assert "kdcli " + command in text.partition("\nExamples:\n")[2]


def test_console_script_and_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "kdcli", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("kdcli ")


def test_errors_are_one_line_and_traceback_only_with_debug(tmp_path):
    args = [sys.executable, "-m", "kdcli", "eval", "missing.safetensors"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "Error: model missing.safetensors does not exist. Check the path"]
    env = {**os.environ, "KDCLI_DEBUG": "1"}
    r = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: ")


def test_json_and_quiet_modes(cli, teacher_file):
    r = cli("eval", teacher_file, "--data", "mnist:test[:200]", "--json")
    assert r.exit_code == 0
    res = json.loads(r.stdout)
    assert res["models"][0]["examples"] == 200 and r.stderr == ""
    r = cli("eval", teacher_file, "--data", "mnist:test[:200]", "--quiet")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""
    r = cli("eval", teacher_file, "--data", "mnist:test[:200]")
    assert "errors" in r.stdout and "accuracy" in r.stdout
    r = cli("eval", teacher_file, "--data", "mnist:test[:200]", "--json", "--quiet")
    assert r.exit_code == 0 and r.stderr == "" and json.loads(r.stdout)["models"]


def test_eval_reports_all_metrics_and_agreement(cli, teacher_file, tmp_path):
    r = cli("eval", teacher_file, teacher_file, "--data", "mnist:test[:300]", "--json")
    res = json.loads(r.stdout)
    m = res["models"][0]
    assert set(m) >= {"errors", "accuracy", "nll", "ece", "params", "file_bytes"}
    assert m["params"] == 784 * 64 + 64 + 64 * 10 + 10
    assert res["agreement"] == [[1.0, 1.0], [1.0, 1.0]]


def test_atomic_output_leaves_nothing_on_failure_and_respects_force(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(DataError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise DataError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode & 0o044  # readable by others (not mkstemp's private 0600)
    with pytest.raises(Exception, match="--force"), atomic_output(target):
        pass
    with atomic_output(target, force=True) as tmp:
        tmp.write_bytes(b"again")
    assert target.read_bytes() == b"again"


def test_error_table_maps_common_failures():
    assert user_message(KeyboardInterrupt())[1] == 130
    assert user_message(Terminated()) == (
        "terminated (SIGTERM). Outputs were not written; rerun (with --resume where supported)",
        143)
    assert "--batch-size" in user_message(MemoryError())[0]
    msg, code = user_message(ValueError("x"))
    assert code == 1 and "KDCLI_DEBUG=1" in msg


def test_option_groups_stand_in_for_one_parameter_each():
    """train and train-student take one option per TrainConfig field (built into the config
    they pass on); the groups' placeholders are gone from what Typer reads."""
    import dataclasses
    import inspect

    from kdcli import cli
    from kdcli.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for cmd in (cli.train_cmd, cli.train_student_cmd):
        params = inspect.signature(cmd).parameters
        assert fields <= set(params)
        assert not {"config", "data_options", "augmentation", "rep"} & set(params)
    assert {"arch", "trust_pickle", "image_size", "quiet"} <= \
        set(inspect.signature(cli.eval_cmd).parameters)
    assert "quiet" not in inspect.signature(cli.inspect_cmd).parameters


def test_an_option_group_needs_its_parameter():
    from kdcli.options import data_options

    def command(data: str) -> None:
        """A command without a data_options parameter."""

    with pytest.raises(TypeError, match="data_options"):
        data_options()(command)
