"""The ``kdcli`` command line: it only wires options to library functions.

Each command checks its options, builds a :class:`~kdcli.output.Reporter` and calls one
library function, which is also the public Python API. Heavy imports (torch, onnx,
onnxruntime) happen inside those functions, so ``kdcli --help`` stays fast.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from kdcli import __version__
from kdcli.errors import UsageError, user_message

app = typer.Typer(
    name="kdcli",
    help="Distil saved neural networks into small, deployable ones "
    "(Hinton, Vinyals & Dean, 2015).\n\n"
    "Typical run: kdcli train (a teacher) -> kdcli soft-targets -> kdcli train-student -> "
    "kdcli export -> kdcli eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed (same seed: same weights on CPU).")]
PrecisionOpt = Annotated[str, typer.Option(help="fp32, or bf16 autocast (faster on CPU/GPU).")]
# Optimization options shared by train and train-student (see kdcli.train.TrainConfig).
BatchOpt = Annotated[int, typer.Option(help="Examples per step.")]
OptimizerOpt = Annotated[str, typer.Option(help="sgd (Nesterov momentum) or adam.")]
MomentumOpt = Annotated[float, typer.Option(help="SGD momentum.")]
WeightDecayOpt = Annotated[float, typer.Option(help="L2 weight decay.")]
ScheduleOpt = Annotated[str, typer.Option(help="cosine (per step) or constant.")]
WarmupOpt = Annotated[float, typer.Option(help="Epochs of linear learning-rate warmup before the schedule (lets a higher --lr train stably).")]
EvalDataOpt = Annotated[str, typer.Option(help="Data for per-epoch test errors (auto: mnist:test for MNIST; none).")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue from OUT.ckpt after an interruption.")]
DryRunOpt = Annotated[bool, typer.Option(help="Train one batch; write nothing.")]
TrainDeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, or auto (cuda when present).")]
StopAfterOpt = Annotated[int | None, typer.Option(help="Stop after this epoch, keeping OUT.ckpt; continue later with --resume (for time-limited job slots).")]
# Augmentation options shared by train and soft-targets (see kdcli.augment.AugmentConfig).
JitterOpt = Annotated[int, typer.Option(help="Shift images by up to K pixels, zero-filled.")]
AugmentOpt = Annotated[str | None, typer.Option(help="Augmentation preset: crop-flip (--crop-pad 4 --flip, the usual choice for natural images) or none; the options below override it.")]
CropPadOpt = Annotated[int | None, typer.Option(help="Random crop of the original size after padding P pixels on each side.", show_default=False)]
PadModeOpt = Annotated[str | None, typer.Option(help="How --crop-pad pads: zero (default) or reflect.", show_default=False)]
FlipOpt = Annotated[bool | None, typer.Option("--flip/--no-flip", help="Mirror images left-right with probability 1/2.", show_default=False)]
NormalizeOpt = Annotated[bool | None, typer.Option("--normalize/--no-normalize", help="Zero-mean, unit-variance inputs, or only scaled (8-bit pixels to [0, 1]). Default: normalize unless --input-dropout is used, so that a dropped pixel is black.", show_default=False)]


# Commands that run under torchrun (the others refuse, rather than race on their outputs).
DISTRIBUTED = ("train", "train-student", "soft-targets")


def command(name: str, example: str) -> Callable[[F], F]:
    """Register a command whose errors become one ``Error: ...`` line and exit code 1."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                if name not in DISTRIBUTED and os.environ.get("WORLD_SIZE", "1") != "1":
                    raise UsageError(f"kdcli {name} does not run under torchrun",
                                     f"Run it as one process; {', '.join(DISTRIBUTED)} "
                                     "can be distributed")
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except BaseException as e:  # noqa: BLE001 - the one error-mapping point
                if isinstance(e, SystemExit):
                    raise
                message, code = user_message(e)
                if os.environ.get("KDCLI_DEBUG") == "1":
                    traceback.print_exc()
                rank = os.environ.get("RANK", "0")  # set by torchrun
                where = f"[rank {rank}] " if rank != "0" else ""
                typer.echo(f"{where}Error: {message}", err=True)
                raise typer.Exit(code) from None

        app.command(name, epilog=f"Example: {example}")(wrapper)
        return fn

    return deco


def _reporter(json_out: bool, quiet: bool):
    from kdcli.output import Reporter

    if json_out and quiet:
        raise UsageError("--json and --quiet exclude each other", "Pass only one")
    return Reporter("json" if json_out else "quiet" if quiet else "rich")


def _ints(text: str | None, flag: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise UsageError(f"bad {flag} {text!r}", f"Use comma-separated integers, e.g. {flag} 7,8") from e


def _floats(text: str | None, flag: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise UsageError(f"bad {flag} {text!r}", f"Use comma-separated numbers, e.g. {flag} 0.5,0.5") from e


def _arch(arch: str | None, hidden: int, layers: int, **kw: Any):
    from kdcli.models import Architecture

    if arch:
        return Architecture.parse(arch, **kw)
    if layers < 0:
        raise UsageError(f"--layers must be 0 or more, got {layers}", "Try --layers 2")
    if hidden <= 0:
        raise UsageError(f"--hidden must be positive, got {hidden}", "Try --hidden 300")
    a = Architecture("mlp", hidden=[hidden] * layers, **kw)
    a.check()
    return a


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


@command("train", "kdcli train --data mnist --hidden 1200 --layers 2 --dropout 0.5 "
         "--input-dropout 0.2 --max-norm 3.5 --jitter 2 --epochs 60 --out teacher.safetensors")
def train_cmd(
    data: Annotated[str, typer.Option(help="Labelled training data: mnist, a path, ...[:N].")] = "mnist",
    hidden: Annotated[int, typer.Option(help="MLP hidden width.")] = 800,
    layers: Annotated[int, typer.Option(help="Number of MLP hidden layers.")] = 2,
    arch: Annotated[str | None, typer.Option(help="Architecture spec instead of --hidden/--layers: mlp:1200,1200, cnn:0.5, or resnet:DEPTH[,WIDTH] (e.g. resnet:20,0.5) for colour images.")] = None,
    dropout: Annotated[float, typer.Option(help="Dropout on hidden units.")] = 0.0,
    input_dropout: Annotated[float, typer.Option(help="Dropout on inputs (MLP).")] = 0.0,
    max_norm: Annotated[float | None, typer.Option(help="Max L2 norm of each hidden unit's incoming weights (the output layer is free).")] = None,
    jitter: JitterOpt = 0,
    augment: AugmentOpt = None,
    crop_pad: CropPadOpt = None,
    pad_mode: PadModeOpt = None,
    flip: FlipOpt = None,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 20,
    batch_size: BatchOpt = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.1,
    optimizer: OptimizerOpt = "sgd",
    momentum: MomentumOpt = 0.9,
    weight_decay: WeightDecayOpt = 0.0,
    schedule: ScheduleOpt = "cosine",
    warmup: WarmupOpt = 0.0,
    precision: PrecisionOpt = "fp32",
    seed: SeedOpt = 0,
    eval_data: EvalDataOpt = "auto",
    limit: Annotated[int | None, typer.Option(help="Use only the first N examples.")] = None,
    out: Annotated[Path, typer.Option(help="Output model file.")] = Path("model.safetensors"),
    resume: ResumeOpt = False,
    dry_run: DryRunOpt = False,
    stop_after: StopAfterOpt = None,
    device: TrainDeviceOpt = "cpu",
    normalize: NormalizeOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model on hard labels (make a teacher or a baseline)."""
    from kdcli.augment import AugmentConfig
    from kdcli.train import TrainConfig, train

    rep = _reporter(json_out, quiet)
    a = _arch(arch, hidden, layers, dropout=dropout, input_dropout=input_dropout, max_norm=max_norm)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                      momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                      precision=precision, seed=seed, dry_run=dry_run, normalize=normalize,
                      stop_after=stop_after, device=device, warmup=warmup)
    aug = AugmentConfig.from_options(augment, jitter=jitter or None, crop_pad=crop_pad,
                                     pad_mode=pad_mode, flip=flip)
    rep.result(train(data, arch=a, out=out, config=cfg, augment=aug, eval_data=eval_data,
                     limit=limit, force=force, resume=resume, reporter=rep))


@command("eval", "kdcli eval teacher.safetensors student.safetensors student.onnx --data mnist:test")
def eval_cmd(
    models: Annotated[list[Path], typer.Argument(help="Model files (kdcli, ONNX, TorchScript, ...).")],
    data: Annotated[str, typer.Option(help="Labelled data.")] = "mnist:test",
    limit: Annotated[int | None, typer.Option(help="Use only the first N examples.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 1000,
    trust_pickle: Annotated[bool, typer.Option(help="Allow pickled modules (runs code from the file).")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Report errors, accuracy, NLL, ECE, size and agreement of models."""
    from kdcli.evaluate import evaluate

    rep = _reporter(json_out, quiet)
    rep.result(evaluate([str(m) for m in models], data, limit=limit, batch_size=batch_size,
                        trust_pickle=trust_pickle, reporter=rep))


@command("soft-targets", "kdcli soft-targets teacher.safetensors --T 20 --out transfer.safetensors")
def soft_targets_cmd(
    teachers: Annotated[list[Path], typer.Argument(help="Teacher file(s); several form an ensemble.")],
    T: Annotated[float, typer.Option("--T", "-T", help="Softmax temperature of the soft targets.")] = 20.0,
    data: Annotated[str, typer.Option(help="Transfer data: mnist:train, a path, ...[:N].")] = "mnist:train",
    out: Annotated[Path, typer.Option(help="Output transfer set: a .safetensors file, or NAME.index.json for a sharded set.")] = Path("transfer.safetensors"),
    combine: Annotated[str, typer.Option(help="Ensemble rule: mean-probs (paper) or mean-logits.")] = "mean-probs",
    weights: Annotated[str | None, typer.Option(help="Ensemble weights, e.g. 0.5,0.3,0.2.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per teacher call.")] = 1024,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 (exact) or bf16 autocast.")] = "fp32",
    arch: Annotated[list[str] | None, typer.Option(help="For a bare state dict: mlp:1200,1200 or package.module:factory (per teacher).")] = None,
    input_shape: Annotated[list[str] | None, typer.Option(help="Per-example shape the teacher takes, e.g. 1,28,28 (per teacher).")] = None,
    scale: Annotated[list[float] | None, typer.Option(help="Divide raw inputs by this (per teacher).")] = None,
    mean: Annotated[list[float] | None, typer.Option(help="Then subtract this (per teacher).")] = None,
    std: Annotated[list[float] | None, typer.Option(help="Then divide by this (per teacher).")] = None,
    teacher_output: Annotated[list[str] | None, typer.Option(help="logits, log-probs or probs (default: detected).")] = None,
    output: Annotated[list[str] | None, typer.Option(help="Which ONNX output to use (per teacher).")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="Allow pickled nn.Modules: this RUNS CODE from the file.")] = False,
    classes: Annotated[str | None, typer.Option(help="Keep only these labels, e.g. 7,8.")] = None,
    exclude_classes: Annotated[str | None, typer.Option(help="Drop these labels, e.g. 3.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N examples.")] = None,
    copies: Annotated[int, typer.Option(help="Add this many augmented copies of each example (augmented by the options below).")] = 0,
    jitter: JitterOpt = 0,
    augment: AugmentOpt = None,
    crop_pad: CropPadOpt = None,
    pad_mode: PadModeOpt = None,
    flip: FlipOpt = None,
    top_k: Annotated[int | None, typer.Option(help="Store only the K largest logits per example, their classes and the tail mass (for many classes).")] = None,
    targets_dtype: Annotated[str, typer.Option(help="Dtype of stored top-k logits: float32 or float16.")] = "float32",
    shard_size: Annotated[str | None, typer.Option(help="Largest shard file of a sharded set, e.g. 500MB (default 1GB with an .index.json --out).")] = None,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a teacher (or an ensemble) and write soft targets at temperature T.

    Teachers may be kdcli models, TorchScript, torch.export (.pt2), ONNX, state dicts
    (with --arch), or pickled modules (with --trust-pickle). Memory stays bounded for any
    number of examples; under torchrun each rank runs the teachers on its own share.
    """
    from kdcli.augment import AugmentConfig
    from kdcli.soft_targets import soft_targets
    from kdcli.teachers import TeacherOptions, parse_shape

    rep = _reporter(json_out, quiet)
    m = len(teachers)
    per = {"arch": arch, "input_shape": input_shape, "scale": scale, "mean": mean, "std": std,
           "output": teacher_output, "output_name": output}
    for flag, values in per.items():
        if values and len(values) not in (1, m):
            raise UsageError(f"--{flag.replace('_', '-')} was given {len(values)} times for {m} "
                             "teachers", "Give it once for all teachers, or once per teacher")
    pick = lambda values, i: values[i if len(values) > 1 else 0] if values else None  # noqa: E731
    opts = [TeacherOptions(arch=pick(arch, i),
                           input_shape=parse_shape(pick(input_shape, i)) if input_shape else None,
                           scale=pick(scale, i), mean=pick(mean, i), std=pick(std, i),
                           output=pick(teacher_output, i), output_name=pick(output, i),
                           trust_pickle=trust_pickle) for i in range(m)]
    rep.result(soft_targets(
        [str(t) for t in teachers], T, data, out, options=opts, combine=combine,
        weights=_floats(weights, "--weights"), batch_size=batch_size, device=device,
        precision=precision, classes=_ints(classes, "--classes"),
        exclude_classes=_ints(exclude_classes, "--exclude-classes"), limit=limit,
        augment=AugmentConfig.from_options(augment, jitter=jitter or None, crop_pad=crop_pad,
                                           pad_mode=pad_mode, flip=flip),
        copies=copies, seed=seed, top_k=top_k, targets_dtype=targets_dtype,
        shard_size=shard_size, force=force, reporter=rep))


@command("train-student", "kdcli train-student --hidden 300 --alpha 0.1")
def train_student_cmd(
    transfer: Annotated[Path, typer.Option(help="Transfer set from soft-targets (a file, or a sharded set's .index.json).")] = Path("transfer.safetensors"),
    hidden: Annotated[int, typer.Option(help="Student MLP hidden width.")] = 300,
    layers: Annotated[int, typer.Option(help="Student MLP hidden layers.")] = 2,
    arch: Annotated[str | None, typer.Option(help="Student spec instead of --hidden/--layers: mlp:800,800, cnn:0.25 or resnet:8,0.5.")] = None,
    dropout: Annotated[float, typer.Option(help="Dropout on hidden units.")] = 0.0,
    alpha: Annotated[float, typer.Option(help="Weight on the hard labels, in [0, 1].")] = 0.1,
    T: Annotated[float | None, typer.Option("--T", "-T", help="Temperature (default: the transfer set's; another value re-derives the targets).")] = None,
    loss: Annotated[str, typer.Option(help="kd: alpha*CE(y,softmax(z)) + (1-alpha)*T^2*CE(p_T,softmax(z/T)); mse: alpha*CE + (1-alpha)*1/2*mean_i (z_i-v_i)^2 on logits, the exact high-T limit of kd.")] = "kd",
    center: Annotated[bool, typer.Option(help="mse: centre both logit vectors per example.")] = True,
    tail: Annotated[str, typer.Option(help="Top-k sets: student (spread the mass outside the top K like the student does), uniform (evenly) or renormalize (drop it).")] = "student",
    epochs: Annotated[int, typer.Option(help="Passes over the transfer set.")] = 20,
    batch_size: BatchOpt = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (T^2 makes early gradients large: keep a --warmup).")] = 0.05,
    optimizer: OptimizerOpt = "sgd",
    momentum: MomentumOpt = 0.9,
    weight_decay: WeightDecayOpt = 0.0,
    schedule: ScheduleOpt = "cosine",
    warmup: WarmupOpt = 1.0,
    precision: PrecisionOpt = "fp32",
    seed: SeedOpt = 0,
    eval_data: EvalDataOpt = "auto",
    out: Annotated[Path, typer.Option(help="Output student model file.")] = Path("student.safetensors"),
    resume: ResumeOpt = False,
    dry_run: DryRunOpt = False,
    stop_after: StopAfterOpt = None,
    device: TrainDeviceOpt = "cpu",
    normalize: NormalizeOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a student against a transfer set at temperature T.

    Loss (kd): L = alpha * CE(y, softmax(z)) + (1 - alpha) * T^2 * CE(p_T, softmax(z / T)).
    Loss (mse): L = alpha * CE(y, softmax(z)) + (1 - alpha) * 1/2 * mean_i (z_i - v_i)^2,
    the exact high-temperature limit of kd (same --lr and --alpha scale).
    """
    from kdcli.train import TrainConfig, train_student

    rep = _reporter(json_out, quiet)
    a = _arch(arch, hidden, layers, dropout=dropout)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                      momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                      precision=precision, seed=seed, dry_run=dry_run, normalize=normalize,
                      stop_after=stop_after, device=device, warmup=warmup)
    rep.result(train_student(transfer, arch=a, alpha=alpha, T=T, loss=loss, center=center,
                             tail=tail, out=out, config=cfg, eval_data=eval_data, force=force,
                             resume=resume, reporter=rep))


@command("export", "kdcli export student.onnx --model student.safetensors")
def export_cmd(
    output: Annotated[Path, typer.Argument(help="The ONNX file to write.")] = Path("student.onnx"),
    model: Annotated[Path, typer.Option(help="kdcli model file to export.")] = Path("student.safetensors"),
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    outputs: Annotated[str, typer.Option(help="logits, probs or both.")] = "logits",
    batch: Annotated[str, typer.Option(help="dynamic, or a fixed batch size.")] = "dynamic",
    atol: Annotated[float, typer.Option(help="Max |logit difference| allowed vs torch.")] = 1e-4,
    data: Annotated[str | None, typer.Option(help="Real inputs to verify on (default: the model's data).")] = None,
    verbose: Annotated[bool, typer.Option(help="Show the exporter's messages and warnings.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a model to ONNX (preprocessing inside) and verify it against torch."""
    from kdcli.export import main_export

    rep = _reporter(json_out, quiet)
    rep.result(main_export(model, output, opset=opset, outputs=outputs, batch=batch, atol=atol,
                           data=data, force=force, verbose=verbose, reporter=rep))


@command("calibrate-bias", "kdcli calibrate-bias --model student.safetensors --teacher teacher.safetensors --data mnist:train --out calibrated.safetensors")
def calibrate_bias_cmd(
    model: Annotated[Path, typer.Option(help="kdcli model to correct.")] = Path("student.safetensors"),
    out: Annotated[Path, typer.Option(help="Corrected model file.")] = Path("calibrated.safetensors"),
    teacher: Annotated[Path | None, typer.Option(help="Teacher whose mean prediction at T=1 on --data is the target.")] = None,
    transfer: Annotated[Path | None, typer.Option(help="Or: a transfer set whose stored logits give the target.")] = None,
    data: Annotated[str | None, typer.Option(help="Inputs to match on; labels unused unless --target labels (default: the model's training data).")] = None,
    target: Annotated[str, typer.Option(help="teacher (mean soft prediction at T=1) or labels (label frequencies).")] = "teacher",
    classes: Annotated[str | None, typer.Option(help="Only shift these classes' biases, e.g. 3.")] = None,
    eval_data: Annotated[str | None, typer.Option(help="Labelled data to report errors before and after.")] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit per-class output-bias shifts so the model's mean prediction matches a target.

    Corrects students whose transfer set lacked classes (the paper raised the 3's bias by 3.5
    by hand); no labels of the missing classes are used.
    """
    from kdcli.calibrate import calibrate_bias

    rep = _reporter(json_out, quiet)
    rep.result(calibrate_bias(model, out, data=data, teacher=teacher, transfer=transfer,
                              target=target, classes=_ints(classes, "--classes"),
                              eval_data=eval_data, force=force, reporter=rep))


@command("sweep", "kdcli sweep teacher.safetensors --T 1,2,2.5,4,8,20 --hidden 30,300 --seeds 0,1")
def sweep_cmd(
    teacher: Annotated[Path, typer.Argument(help="The teacher model file.")],
    T: Annotated[str, typer.Option("--T", "-T", help="Temperatures, e.g. 1,2,2.5,4,8,20.")] = "1,2,4,8,20",
    hidden: Annotated[str, typer.Option(help="Student widths, e.g. 30,300.")] = "30,300",
    layers: Annotated[int, typer.Option(help="Hidden layers of each student.")] = 2,
    data: Annotated[str, typer.Option(help="Transfer data.")] = "mnist:train",
    alpha: Annotated[float, typer.Option(help="Weight on the hard labels.")] = 0.0,
    epochs: Annotated[int, typer.Option(help="Epochs per student.")] = 20,
    lr: Annotated[float, typer.Option(help="Learning rate per student.")] = 0.05,
    warmup: WarmupOpt = 1.0,
    batch_size: BatchOpt = 256,
    precision: PrecisionOpt = "fp32",
    seeds: Annotated[str, typer.Option("--seeds", "--seed", help="Seeds, e.g. 0,1,2: one student per seed at each grid point, reported as mean ± sd.")] = "0",
    eval_data: EvalDataOpt = "auto",
    out_dir: Annotated[Path, typer.Option(help="Folder for everything the sweep writes (finished points are kept).")] = Path("sweep"),
    force: Annotated[bool, typer.Option("--force", "-f", help="Start afresh: delete what an earlier sweep left in --out-dir.")] = False,
    device: TrainDeviceOpt = "cpu",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train students over a grid of T and widths; print a table and plot errors against T."""
    from kdcli.sweep import sweep

    rep = _reporter(json_out, quiet)
    rep.result(sweep(teacher, temperatures=_floats(T, "--T") or [], hidden=_ints(hidden, "--hidden") or [],
                     layers=layers, data=data, alpha=alpha, epochs=epochs, lr=lr, warmup=warmup,
                     batch_size=batch_size, precision=precision,
                     seeds=_ints(seeds, "--seeds") or [], eval_data=eval_data,
                     out_dir=out_dir, force=force, device=device, reporter=rep))


@command("inspect", "kdcli inspect transfer.safetensors")
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="A transfer set, kdcli model or ONNX export.")],
    json_out: JsonOpt = False,
) -> None:
    """Show a file's format, metadata, tensors and dark knowledge."""
    from kdcli.inspection import inspect_file

    rep = _reporter(json_out, False)
    rep.result(inspect_file(file, reporter=rep))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="kdcli")


if __name__ == "__main__":
    sys.exit(main())
