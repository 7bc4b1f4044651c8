"""The ``kdcli`` command line: the app, the one error wrapper, and the commands.

Each command takes its options (defined once in :mod:`kdcli.options`), builds a
:class:`~kdcli.output.Reporter` and calls one library function, which is also the public
Python API. Heavy imports (torch, onnx, onnxruntime) happen inside those functions, so
``kdcli --help`` stays fast.

No ``from __future__ import annotations`` here: Typer reads the commands' signatures, which
the option groups of :mod:`kdcli.options` rewrite, with their annotations evaluated.
"""

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kdcli import __version__
from kdcli.config import SWEEP_ALPHA, DistillConfig, TrainConfig, WordsConfig, student_config
from kdcli.errors import UsageError, one_line, quiet_libraries, user_message
from kdcli.helpformat import Command, Group
from kdcli.options import (
    BatchOpt,
    CopySeedOpt,
    EpochsOpt,
    EvalDataOpt,
    F,
    ForceOpt,
    GradClipOpt,
    LimitOpt,
    MaxCategoriesOpt,
    PrecisionOpt,
    ResumeOpt,
    TrainDeviceOpt,
    WarmupOpt,
    architecture,
    augment_options,
    data_options,
    floats,
    ints,
    model_options,
    output_options,
    text_augment_options,
    train_options,
    words_options,
)
from kdcli.students import examples

if TYPE_CHECKING:
    from kdcli.data.augment import AugmentConfig
    from kdcli.data.base import DataOptions
    from kdcli.data.text_augment import TextAugment
    from kdcli.output import Reporter
    from kdcli.teachers.base import TeacherOptions


class _OneLineErrors(Group):
    """The command group: usage errors (unknown option, bad value) become one line, exit 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            typer.echo("Error: aborted", err=True)
            sys.exit(1)
        except Exception as e:  # click's usage errors; typer does not re-export the class
            code, fmt = getattr(e, "exit_code", None), getattr(e, "format_message", None)
            if not isinstance(code, int) or fmt is None:
                raise
            if type(e).__name__ == "NoArgsIsHelpError":  # bare "kdcli": show the help
                e.show()
                sys.exit(code)
            ctx = getattr(e, "ctx", None)
            path = ctx.command_path if ctx is not None else "kdcli COMMAND"
            where = f" Run '{path} --help' for the options"
            message = one_line(" ".join(str(fmt()).split()).rstrip("."))
            typer.echo(f"Error: {message}.{where}", err=True)
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="kdcli",
    cls=_OneLineErrors,
    help="Distil saved neural networks into small, deployable ones "
    "(Hinton, Vinyals & Dean, 2015).\n\n"
    "Typical run: kdcli train (a teacher), then kdcli soft-targets, kdcli train-student, "
    "kdcli export and kdcli eval. Each command's --help shows examples; "
    "pip install \"kdcli[hf]\" adds Hugging Face teachers.",
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# The option defaults, from the one place each is defined (kdcli.config).
_TRAIN, _STUDENT, _DISTILL = TrainConfig(), student_config(), DistillConfig()


# Commands that run under torchrun (the others refuse, rather than race on their outputs).
DISTRIBUTED = ("train", "train-student", "soft-targets")


def command(name: str, *examples: str) -> Callable[[F], F]:
    """Register a command whose errors become one ``Error: ...`` line and exit code 1.

    ``examples`` are shown under "Examples:" in its ``--help``, each a command line or a
    caption (``# ...``).
    """

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from kdcli.distributed import launched_rank, launched_world
            from kdcli.io.files import handle_signals

            try:
                if name not in DISTRIBUTED and launched_world() != "1":
                    raise UsageError(f"kdcli {name} does not run under torchrun",
                                     f"Run it as one process; {', '.join(DISTRIBUTED)} "
                                     "can be distributed")
                with handle_signals(), quiet_libraries(
                        not (kwargs.get("json_out") or kwargs.get("quiet"))):
                    return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except BaseException as e:  # noqa: BLE001 - the one error-mapping point
                if isinstance(e, SystemExit):
                    raise
                message, code = user_message(e)
                if os.environ.get("KDCLI_DEBUG") == "1":
                    traceback.print_exc()
                rank = launched_rank()
                where = f"[rank {rank}] " if rank != "0" else ""
                typer.echo(f"{where}Error: {message}", err=True)
                raise typer.Exit(code) from None

        app.command(name, cls=Command, epilog="\n".join(examples))(wrapper)
        return fn

    return deco


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Distil saved neural networks into small, deployable ones."""


@command("train", "# The paper's MNIST teacher",
         "kdcli train --data mnist --hidden 1200 --dropout 0.5 --input-dropout 0.2 "
         "--max-norm 3.5 --jitter 2 --epochs 60 --out teacher.safetensors",
         "# A table (CSV or Parquet) whose label column is species",
         "kdcli train --data penguins.csv --label-column species --hidden 64 "
         "--out teacher.safetensors")
@output_options()
@data_options()
@augment_options()
@words_options()
@train_options(_TRAIN, "Peak learning rate.", "normalize, but not with --input-dropout, so that a dropped pixel is black")
def train_cmd(
    *,
    data_options: "DataOptions",
    data: Annotated[str, typer.Option(metavar="SPEC", help="Labelled training data: mnist, a path, ...; [:N] takes the first N.")] = "mnist",
    hidden: Annotated[int | None, typer.Option(metavar="N", help="MLP hidden width  [default: 800]", show_default=False)] = None,
    layers: Annotated[int | None, typer.Option(metavar="N", help="Number of MLP hidden layers  [default: 2]", show_default=False)] = None,
    arch: Annotated[str | None, typer.Option(metavar="SPEC", help=f"Architecture instead of --hidden/--layers, e.g. {examples()}.")] = None,
    dropout: Annotated[float, typer.Option(metavar="P", help="Dropout on hidden units.")] = 0.0,
    input_dropout: Annotated[float, typer.Option(metavar="P", help="Dropout on inputs (MLP).")] = 0.0,
    max_norm: Annotated[float | None, typer.Option(metavar="X", help="Max L2 norm of each hidden unit's incoming weights (not the output layer's).")] = None,
    augmentation: "AugmentConfig",
    words: WordsConfig,
    config: TrainConfig,
    eval_data: EvalDataOpt = "auto",
    limit: LimitOpt = None,
    num_classes: Annotated[int | None, typer.Option(metavar="N", help="Classes of the model (default: largest label + 1; refused if most would have no example).")] = None,
    out: Annotated[Path, typer.Option(metavar="FILE", help="Output model file.")] = Path("model.safetensors"),
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    rep: "Reporter",
) -> None:
    """Train a model on hard labels (make a teacher or a baseline)."""
    from kdcli.train import train

    a = architecture(arch, hidden, layers, (800, 2), dropout=dropout,
                     input_dropout=input_dropout, max_norm=max_norm)
    rep.result(train(data, arch=a, out=out, config=config, augment=augmentation,
                     eval_data=eval_data, limit=limit, num_classes=num_classes, force=force,
                     resume=resume, reporter=rep, data_options=data_options, words=words))


@command("eval", "kdcli eval teacher.safetensors student.safetensors student.onnx --data mnist:test",
         "# A table, with a scikit-learn teacher converted to ONNX",
         "kdcli eval teacher.onnx student.safetensors --data test.csv --label-column species")
@output_options()
@data_options()
@model_options(per="models")
def eval_cmd(
    models: Annotated[list[Path], typer.Argument(metavar="MODEL", help="Model files (kdcli, ONNX, TorchScript, ...).")],
    *,
    data_options: "DataOptions",
    data: Annotated[str, typer.Option(metavar="SPEC", help="Labelled data.")] = "mnist:test",
    limit: LimitOpt = None,
    batch_size: Annotated[int, typer.Option(metavar="N", help="Examples per forward pass.")] = 1000,
    options: "list[TeacherOptions]",
    rep: "Reporter",
) -> None:
    """Report errors, accuracy, NLL, ECE, size and agreement of models."""
    from kdcli.evaluate import evaluate

    rep.result(evaluate([str(m) for m in models], data, limit=limit, batch_size=batch_size,
                        options=options, reporter=rep, data_options=data_options))


@command("soft-targets", "kdcli soft-targets teacher.safetensors --T 20 --out transfer.safetensors",
         "# A foreign teacher: a scikit-learn or XGBoost classifier converted to ONNX",
         "kdcli soft-targets teacher.onnx --data train.csv --label-column species "
         "--out transfer.safetensors",
         "# An ensemble of two teachers, weighted",
         "kdcli soft-targets a.safetensors b.onnx --weights 0.7,0.3")
@output_options()
@data_options()
@model_options(per="teachers")
@augment_options()
@text_augment_options()
def soft_targets_cmd(
    teachers: Annotated[list[Path], typer.Argument(metavar="TEACHER", help="Teacher files or Hugging Face checkpoint folders; several form an ensemble.")],
    *,
    data_options: "DataOptions",
    T: Annotated[float | None, typer.Option("--T", "-T", metavar="T", help="Softmax temperature  [default: 20, the paper's; 2 when every teacher outputs probabilities, as tree ensembles do]", show_default=False)] = None,
    data: Annotated[str, typer.Option(metavar="SPEC", help="Transfer data: mnist:train, a path, ...; [:N] takes the first N.")] = "mnist:train",
    out: Annotated[Path, typer.Option(metavar="FILE", help="Output transfer set: a .safetensors file, or NAME.index.json for a sharded one.")] = Path("transfer.safetensors"),
    combine: Annotated[str, typer.Option(metavar="RULE", help="Ensemble rule: mean-probs (paper) or mean-logits.")] = "mean-probs",
    weights: Annotated[str | None, typer.Option(metavar="W,W,...", help="Ensemble weights, e.g. 0.5,0.3,0.2.")] = None,
    batch_size: Annotated[int, typer.Option(metavar="N", help="Examples per teacher call.")] = 1024,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu or cuda.")] = "auto",
    precision: PrecisionOpt = "auto",
    options: "list[TeacherOptions]",
    classes: Annotated[str | None, typer.Option(metavar="LABELS", help="Keep only these labels, e.g. 7,8.")] = None,
    exclude_classes: Annotated[str | None, typer.Option(metavar="LABELS", help="Drop these labels, e.g. 3.")] = None,
    limit: LimitOpt = None,
    copies: Annotated[int, typer.Option(metavar="N", help="Augmented copies of each example to add (see the augmentation options).")] = 0,
    augmentation: "AugmentConfig",
    text_augment: "TextAugment",
    top_k: Annotated[int | None, typer.Option(metavar="K", help="Store only the K largest logits per example (for many classes).")] = None,
    targets_dtype: Annotated[str, typer.Option(metavar="DTYPE", help="Dtype of stored top-k logits: float32 or float16.")] = "float32",
    shard_size: Annotated[str | None, typer.Option(metavar="SIZE", help="Largest shard file of a sharded set, e.g. 500MB (default: 1GB with an .index.json --out).")] = None,
    seed: CopySeedOpt = 0,
    force: ForceOpt = False,
    rep: "Reporter",
) -> None:
    """Run a teacher (or an ensemble) and write soft targets at temperature T.

    Teachers may be kdcli models, TorchScript, torch.export (.pt2), ONNX (including
    scikit-learn, XGBoost and LightGBM classifiers), Hugging Face checkpoint folders
    (pip install "kdcli[hf]"), state dicts (with --arch), or pickled modules (with
    --trust-pickle).

    Memory stays bounded for any number of examples; under torchrun each rank runs the
    teachers on its own share. With --top-k, only each example's K largest logits, their
    classes and the mass of the rest are stored (for many classes).
    """
    from kdcli.checks import check_class_filter
    from kdcli.soft_targets import soft_targets

    keep, drop = ints(classes, "--classes"), ints(exclude_classes, "--exclude-classes")
    check_class_filter(keep, drop)
    rep.result(soft_targets(
        [str(t) for t in teachers], T, data, out, options=options, combine=combine,
        weights=floats(weights, "--weights"), batch_size=batch_size, device=device,
        precision=precision, classes=keep, exclude_classes=drop, limit=limit,
        augment=augmentation, copies=copies, seed=seed, top_k=top_k, targets_dtype=targets_dtype,
        shard_size=shard_size, force=force, reporter=rep, data_options=data_options,
        text_augment=text_augment))


@command("train-student", "kdcli train-student --hidden 300 --alpha 0.1 --out student.safetensors",
         "# The logit-matching loss, the high-temperature limit of kd",
         "kdcli train-student --loss mse --center --out student.safetensors")
@output_options()
@data_options()
@words_options()
@train_options(_STUDENT, "Peak learning rate (T^2 makes early gradients large: keep a --warmup).",
               "normalize, but not for a student --arch with input dropout")
def train_student_cmd(
    *,
    data_options: "DataOptions",
    transfer: Annotated[Path, typer.Option(metavar="FILE", help="Transfer set from soft-targets (a file, or a sharded set's .index.json).")] = Path("transfer.safetensors"),
    hidden: Annotated[int | None, typer.Option(metavar="N", help="Student MLP hidden width  [default: 300]", show_default=False)] = None,
    layers: Annotated[int | None, typer.Option(metavar="N", help="Student MLP hidden layers  [default: 2]", show_default=False)] = None,
    arch: Annotated[str | None, typer.Option(metavar="SPEC", help=f"Student architecture instead of --hidden/--layers, e.g. {examples()}.")] = None,
    dropout: Annotated[float, typer.Option(metavar="P", help="Dropout on hidden units.")] = 0.0,
    alpha: Annotated[float, typer.Option(metavar="A", help="Weight on the hard labels, in [0, 1].")] = _DISTILL.alpha,
    T: Annotated[float | None, typer.Option("--T", "-T", metavar="T", help="Temperature (default: the transfer set's; another one re-derives the targets).")] = None,
    loss: Annotated[str, typer.Option(metavar="NAME", help="kd (soft targets at T) or mse (logits); see the loss above.")] = _DISTILL.loss,
    center: Annotated[bool, typer.Option(help="mse: centre both logit vectors per example.")] = _DISTILL.center,
    tail: Annotated[str, typer.Option(metavar="RULE", help="Top-k sets: how the mass outside the top K is spread: student, uniform or renormalize (see above).")] = _DISTILL.tail,
    words: WordsConfig,
    config: TrainConfig,
    eval_data: EvalDataOpt = "auto",
    out: Annotated[Path, typer.Option(metavar="FILE", help="Output student model file.")] = Path("student.safetensors"),
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    rep: "Reporter",
) -> None:
    """Train a student against a transfer set at temperature T.

    The loss (--loss), with y the label, z the student's logits, p_T the soft targets
    and v the teacher's logits:

    \b
    kd:  alpha * CE(y, softmax(z)) + (1 - alpha) * T^2 * CE(p_T, softmax(z / T))
    mse: alpha * CE(y, softmax(z)) + (1 - alpha) * 1/2 * mean_i (z_i - v_i)^2,
         the exact high-temperature limit of kd (same --lr and --alpha scale).

    A top-k transfer set stores only the K largest logits; --tail spreads the rest of
    the mass like the student does (student), evenly (uniform), or drops it
    (renormalize).
    """
    from kdcli.train import train_student

    a = architecture(arch, hidden, layers, (300, 2), dropout=dropout)
    distill = DistillConfig(T=T, alpha=alpha, loss=loss, center=center, tail=tail)
    rep.result(train_student(transfer, arch=a, distill=distill, out=out, config=config,
                             eval_data=eval_data, force=force, resume=resume, reporter=rep,
                             data_options=data_options, words=words))


@command("export", "kdcli export student.onnx --model student.safetensors",
         "# Verify on real rows of a table, outputting probabilities",
         "kdcli export student.onnx --data test.csv --outputs probs")
@output_options()
@data_options(only_given=True)
def export_cmd(
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="The ONNX file to write.")] = Path("student.onnx"),
    *,
    data_options: "DataOptions | None",
    model: Annotated[Path, typer.Option(metavar="FILE", help="kdcli model file to export.")] = Path("student.safetensors"),
    opset: Annotated[int | None, typer.Option(metavar="N", help="ONNX opset (default: the exporter's).")] = None,
    outputs: Annotated[str, typer.Option(metavar="WHICH", help="logits, probs or both.")] = "logits",
    batch: Annotated[str, typer.Option(metavar="N|dynamic", help="dynamic, or a fixed batch size.")] = "dynamic",
    atol: Annotated[float, typer.Option(metavar="X", help="Max |logit difference| allowed vs torch.")] = 1e-4,
    data: Annotated[str | None, typer.Option(metavar="SPEC", help="Real inputs to verify on (default: bundled MNIST if the model was trained on it).")] = None,
    verbose: Annotated[bool, typer.Option(help="Show the exporter's messages and warnings.")] = False,
    force: ForceOpt = False,
    rep: "Reporter",
) -> None:
    """Export a model to ONNX (preprocessing inside) and verify it against torch.

    The data a model was trained on from a path is not read again unless named with
    --data.
    """
    from kdcli.export import main_export

    rep.result(main_export(model, output, opset=opset, outputs=outputs, batch=batch, atol=atol,
                           data=data, force=force, verbose=verbose, reporter=rep,
                           data_options=data_options))


@command("calibrate-bias", "kdcli calibrate-bias --model student.safetensors --teacher teacher.safetensors "
         "--data mnist:train --out calibrated.safetensors")
@output_options()
@data_options(only_given=True)
@model_options()
def calibrate_bias_cmd(
    *,
    data_options: "DataOptions | None",
    model: Annotated[Path, typer.Option(metavar="FILE", help="kdcli model to correct.")] = Path("student.safetensors"),
    out: Annotated[Path, typer.Option(metavar="FILE", help="Corrected model file.")] = Path("calibrated.safetensors"),
    teacher: Annotated[Path | None, typer.Option(metavar="FILE", help="Teacher whose mean prediction at T=1 on --data is the target.")] = None,
    transfer: Annotated[Path | None, typer.Option(metavar="FILE", help="Or: a transfer set whose stored logits give the target.")] = None,
    data: Annotated[str | None, typer.Option(metavar="SPEC", help="Inputs to match on (default: bundled MNIST if the model was trained on it).")] = None,
    target: Annotated[str, typer.Option(metavar="WHAT", help="teacher (mean soft prediction at T=1) or labels (label frequencies).")] = "teacher",
    classes: Annotated[str | None, typer.Option(metavar="LABELS", help="Only shift these classes' biases, e.g. 3.")] = None,
    eval_data: Annotated[str | None, typer.Option(metavar="SPEC", help="Labelled data to report errors before and after.")] = None,
    options: "list[TeacherOptions]",
    force: ForceOpt = False,
    rep: "Reporter",
) -> None:
    """Fit per-class output-bias shifts so the model's mean prediction matches a target.

    Corrects students whose transfer set lacked classes (the paper raised the 3's bias by
    3.5 by hand); no labels of the missing classes are used. The labels of --data are read
    only with --target labels; data read from a path when the model was trained is not read
    again unless named with --data.
    """
    from kdcli.calibrate import calibrate_bias

    rep.result(calibrate_bias(model, out, data=data, teacher=teacher, transfer=transfer,
                              options=options[0], target=target,
                              classes=ints(classes, "--classes"), eval_data=eval_data,
                              force=force, reporter=rep, data_options=data_options))


@command("sweep", "kdcli sweep teacher.safetensors --T 1,2,2.5,4,8,20 --hidden 30,300 --seeds 0,1",
         "# Text: bag-of-words students of widths 32 and 128, one vocabulary for all",
         "kdcli sweep teacher.onnx --data train.jsonl --text-column text --family bow "
         "--hidden 32,128 --T 1,4 --eval-data test.jsonl")
@output_options()
@data_options()
@words_options()
def sweep_cmd(
    teacher: Annotated[Path, typer.Argument(metavar="TEACHER", help="The teacher model file.")],
    *,
    data_options: "DataOptions",
    T: Annotated[str, typer.Option("--T", "-T", metavar="T,T,...", help="Temperatures, e.g. 1,2,2.5,4,8,20.")] = "1,2,4,8,20",
    hidden: Annotated[str, typer.Option(metavar="N,N,...", help="Student widths, e.g. 30,300 (a text family's D or H).")] = "30,300",
    layers: Annotated[int, typer.Option(metavar="N", help="Hidden layers of each mlp student (a transformer's layers).")] = 2,
    family: Annotated[str, typer.Option(metavar="NAME", help="Student family: mlp, or on texts bow, bilstm, kimcnn or transformer (width D).")] = "mlp",
    data: Annotated[str, typer.Option(metavar="SPEC", help="Transfer data.")] = "mnist:train",
    alpha: Annotated[float, typer.Option(metavar="A", help="Weight on the hard labels.")] = SWEEP_ALPHA,
    epochs: EpochsOpt = None,
    lr: Annotated[float, typer.Option(metavar="RATE", help="Learning rate per student.")] = _STUDENT.lr,
    warmup: WarmupOpt = _STUDENT.warmup,
    grad_clip: GradClipOpt = _STUDENT.grad_clip,
    batch_size: BatchOpt = _STUDENT.batch_size,
    precision: PrecisionOpt = _STUDENT.precision,
    seeds: Annotated[str, typer.Option("--seeds", "--seed", metavar="N,N,...", help="Seeds, e.g. 0,1,2: a student per seed at each point, reported as mean ± sd.")] = "0",
    eval_data: EvalDataOpt = "auto",
    out_dir: Annotated[Path, typer.Option(metavar="DIR", help="Folder for everything the sweep writes (finished points are kept).")] = Path("sweep"),
    force: Annotated[bool, typer.Option("--force", "-f", help="Start afresh: delete what an earlier sweep left in --out-dir.")] = False,
    device: TrainDeviceOpt = _STUDENT.device,
    max_categories: MaxCategoriesOpt = _STUDENT.max_categories,
    words: WordsConfig,
    rep: "Reporter",
) -> None:
    """Train students over a grid of T and widths; print a table and plot errors against T.

    On texts (--text-column), the students are a text --family, trained with its own
    optimizer and learning rate unless --lr is given; the vocabulary is fitted once on the
    transfer set and shared by every student.
    """
    from kdcli.sweep import sweep

    cfg = student_config(epochs=epochs, lr=lr, warmup=warmup, grad_clip=grad_clip,
                         batch_size=batch_size, precision=precision, device=device,
                         max_categories=max_categories)
    rep.result(sweep(teacher, temperatures=floats(T, "--T") or [],
                     hidden=ints(hidden, "--hidden") or [], layers=layers, data=data,
                     distill=DistillConfig(alpha=alpha), config=cfg,
                     seeds=ints(seeds, "--seeds") or [], eval_data=eval_data, out_dir=out_dir,
                     force=force, reporter=rep, data_options=data_options, family=family,
                     words=words))


@command("inspect", "kdcli inspect transfer.safetensors", "kdcli inspect teacher.onnx")
@output_options(quiet=False)
def inspect_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A transfer set, kdcli model, ONNX model or Hugging Face checkpoint folder.")],
    *,
    verify: Annotated[bool, typer.Option(help="Transfer sets: also verify the checksums and every row (as training does).")] = False,
    rep: "Reporter",
) -> None:
    """Show a file's format, metadata, tensors and dark knowledge."""
    from kdcli.inspection import inspect_file

    rep.result(inspect_file(file, reporter=rep, verify=verify))


def main() -> None:
    """Console-script entry point."""
    from kdcli.io.files import exit_on_signals, hold_signals_for_exit

    exit_on_signals()
    try:
        app(prog_name="kdcli")
    finally:
        hold_signals_for_exit()


if __name__ == "__main__":
    sys.exit(main())
