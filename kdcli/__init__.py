"""kdcli: distil saved neural networks into small, deployable ones.

Implements Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015).
The public Python API is one function per CLI command, and the settings they take::

    from kdcli.train import train, train_student
    from kdcli.soft_targets import soft_targets
    from kdcli.export import main_export
    from kdcli.evaluate import evaluate
    from kdcli.calibrate import calibrate_bias
    from kdcli.sweep import sweep
    from kdcli.inspection import inspect_file
    from kdcli.config import DistillConfig, TrainConfig, student_config
    from kdcli.data.augment import AugmentConfig
    from kdcli.students.base import Architecture
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

if _os.path.basename((_sys.argv or [""])[0]) == "kdcli":  # the console script: a signal
    from kdcli.io.files import exit_on_signals  # while the CLI is imported is one line

    exit_on_signals()
