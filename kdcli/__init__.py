"""kdcli: distil saved neural networks into small, deployable ones.

Implements Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015).
The public Python API is one function per CLI command::

    from kdcli.train import train, train_student
    from kdcli.soft_targets import soft_targets
    from kdcli.export import main_export
    from kdcli.evaluate import evaluate
"""

__version__ = "0.1.0"
