"""`kdcli --help` start-up time against a one-command Typer app and `import torch`, in the
same run.

The one-command Typer app (three options) is the floor that Typer's rich help rendering sets
for any ``--help``; the target is kdcli's ``--help`` within 1.3x of it.
"""

import subprocess
import sys
import tempfile

from common import median_of, report

N = 15


def run(args: list[str]) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


MINIMAL_APP = """
import typer
app = typer.Typer()
@app.command()
def a(x: int = 1, y: str = "s", z: float = 0.1): pass
@app.command()
def b(x: int = 1): pass
app()
"""

ONE_COMMAND_APP = """
import typer
app = typer.Typer()
@app.command()
def a(x: int = 1, y: str = "s", z: float = 0.1): pass
app()
"""
TARGET_RATIO = 1.3


def main() -> None:
    kd = [sys.executable, "-m", "kdcli"]
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as minimal:
        minimal.write(MINIMAL_APP)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as one:
        one.write(ONE_COMMAND_APP)
    times = {
        "kdcli --help": median_of(lambda: run([*kd, "--help"]), N),
        "kdcli train --help": median_of(lambda: run([*kd, "train", "--help"]), N),
        "kdcli soft-targets --help": median_of(lambda: run([*kd, "soft-targets", "--help"]), N),
        "python -c 'import torch'": median_of(
            lambda: run([sys.executable, "-c", "import torch"]), 5),
        "minimal Typer app: a --help": median_of(
            lambda: run([sys.executable, minimal.name, "a", "--help"]), N),
        "one-command Typer app --help": median_of(
            lambda: run([sys.executable, one.name, "--help"]), N),
        "python -c 'pass'": median_of(lambda: run([sys.executable, "-c", "pass"]), N),
    }
    torch_t = times["python -c 'import torch'"]
    rows = [(k, f"{v:.3f} s median  ({v / torch_t:.2f}x import torch)") for k, v in times.items()]
    ratio = times["kdcli --help"] / times["one-command Typer app --help"]
    ok = ratio <= TARGET_RATIO
    rows.append((f"kdcli --help / one-command Typer app --help (target <= {TARGET_RATIO}x)",
                 f"{ratio:.2f}x, {'met' if ok else 'NOT met'}"))
    report("start-up", rows, {"seconds": times, "ratio_to_typer": ratio, "target_met": ok})


if __name__ == "__main__":
    main()
