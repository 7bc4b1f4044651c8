"""`kdcli --help` start-up time against `python -c "import torch"`, in the same run."""

import subprocess
import sys

from common import median_of, report

N = 15


def run(args: list[str]) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    kd = [sys.executable, "-m", "kdcli"]
    times = {
        "kdcli --help": median_of(lambda: run([*kd, "--help"]), N),
        "kdcli train --help": median_of(lambda: run([*kd, "train", "--help"]), N),
        "kdcli soft-targets --help": median_of(lambda: run([*kd, "soft-targets", "--help"]), N),
        "python -c 'import torch'": median_of(
            lambda: run([sys.executable, "-c", "import torch"]), 5),
        "python -c 'pass'": median_of(lambda: run([sys.executable, "-c", "pass"]), N),
    }
    torch_t = times["python -c 'import torch'"]
    rows = [(k, f"{v:.3f} s median  ({v / torch_t:.2f}x import torch)") for k, v in times.items()]
    ok = max(times["kdcli --help"], times["kdcli train --help"]) <= 0.15
    rows.append(("target: help <= 0.15 s", "met" if ok else "NOT met"))
    report("start-up", rows, {"seconds": times, "target_met": ok})


if __name__ == "__main__":
    main()
