"""The command line's options, each defined once, and what turns them into settings.

Options that several commands take are ``Annotated`` aliases (as in huggingface_hub's
``hf`` command line). Sets of options that always go together are groups: a decorator such
as :func:`data_options` puts the group's options in the place of one parameter of the
command (``inspect.Signature``, which Typer reads) and hands the command the one object
they build, such as a :class:`~kdcli.data.base.DataOptions`.

Start-up module: nothing here imports torch; the objects are built when a command runs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from kdcli.checks import check_arch_spec, check_width, split_list
from kdcli.config import TrainConfig, WordsConfig
from kdcli.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
SeedOpt = Annotated[int, typer.Option(metavar="N", help="Random seed (same seed: same weights on CPU).")]
# soft-targets: the seed draws only the augmented copies.
CopySeedOpt = Annotated[int, typer.Option("--seed", metavar="N", help="Random seed of the augmented copies (same seed: same copies).")]
PrecisionOpt = Annotated[str, typer.Option(metavar="MODE", help="auto (bf16 autocast on a GPU with bf16 or a CPU with bf16 instructions, else fp32; KDCLI_AUTO_PRECISION=fp32 pins it), fp32 or bf16.")]
LimitOpt = Annotated[int | None, typer.Option(metavar="N", help="Use only the first N examples.")]
# Optimization options of train and train-student (see train_options) and sweep.
BatchOpt = Annotated[int, typer.Option(metavar="N", help="Examples per step.")]
OptimizerOpt = Annotated[str, typer.Option(metavar="NAME", help="sgd (Nesterov momentum) or adam.")]
MomentumOpt = Annotated[float, typer.Option(metavar="M", help="SGD momentum.")]
WeightDecayOpt = Annotated[float, typer.Option(metavar="W", help="L2 weight decay.")]
ScheduleOpt = Annotated[str, typer.Option(metavar="NAME", help="cosine (per step) or constant.")]
WarmupOpt = Annotated[float, typer.Option(metavar="EPOCHS", help="Epochs of linear learning-rate warmup (lets a higher --lr train stably).")]
EpochsOpt = Annotated[int | None, typer.Option(metavar="N", help="Passes over the data  [default: 20, or more for at least 2,000 steps, at most 1,000 epochs]", show_default=False)]
GradClipOpt = Annotated[float, typer.Option(metavar="NORM", help="Rescale each step's gradient to at most this L2 norm (0: off).")]
EvalDataOpt = Annotated[str, typer.Option(metavar="SPEC", help="Data for per-epoch test errors, or none (auto: mnist:test when training on MNIST).")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue from OUT.ckpt after an interruption.")]
DryRunOpt = Annotated[bool, typer.Option(help="Train one batch; write nothing.")]
TrainDeviceOpt = Annotated[str, typer.Option(metavar="DEVICE", help="cpu, cuda, or auto (cuda when present).")]
StopAfterOpt = Annotated[int | None, typer.Option(metavar="EPOCH", help="Stop after this epoch, keeping OUT.ckpt for --resume (for time-limited jobs).")]
NORMALIZE_HELP = "Zero-mean, unit-variance inputs, or only scaled (8-bit pixels to [0, 1])."


def normalize_option(default: str) -> Any:
    """The --normalize/--no-normalize option, whose help names the command's default."""
    return Annotated[bool | None, typer.Option("--normalize/--no-normalize", help=f"{NORMALIZE_HELP}  [default: {default}]", show_default=False)]
MaxCategoriesOpt = Annotated[int, typer.Option(metavar="N", help="Table: one-hot inputs per category column at most; rarer categories share an 'other' input.")]
NormalizeByOpt = Annotated[str, typer.Option(metavar="HOW", help="How --normalize standardizes: auto (tables per feature, colour images per channel, else one mean and std), scalar, channel or feature.")]
# Augmentation options of train and soft-targets (see augment_options).
JitterOpt = Annotated[int, typer.Option(metavar="K", help="Shift images by up to K pixels, zero-filled.")]
AugmentOpt = Annotated[str | None, typer.Option(metavar="PRESET", help="crop-flip (--crop-pad 4 --flip, for natural images) or none; the options below override it.")]
CropPadOpt = Annotated[int | None, typer.Option(metavar="P", help="Random crop of the original size after padding P pixels on each side.", show_default=False)]
PadModeOpt = Annotated[str | None, typer.Option(metavar="MODE", help="How --crop-pad pads: zero (default) or reflect.", show_default=False)]
FlipOpt = Annotated[bool | None, typer.Option("--flip/--no-flip", help="Mirror images left-right with probability 1/2.", show_default=False)]
# How tables and image folders are read, for every command that reads data (data_options).
_PANEL = "Tables, text and image folders"
LabelColumnOpt = Annotated[str | None, typer.Option(metavar="NAME", help="Table: the label column (default: label when present, else unlabelled; none: unlabelled).", rich_help_panel=_PANEL)]
FeatureColumnsOpt = Annotated[str | None, typer.Option(metavar="NAMES", help="Table: feature columns, comma-separated (default: every other column of numbers or categories).", rich_help_panel=_PANEL)]
MissingOpt = Annotated[str | None, typer.Option(metavar="RULE", help="Table: a missing value is impute (default: NaN, or the category ''; a student trained on gaps fills them in) or error.", rich_help_panel=_PANEL)]
TextColumnOpt = Annotated[str | None, typer.Option(metavar="NAME[,NAME]", help="Table: the text column, or two for sentence pairs; the examples are texts.", rich_help_panel=_PANEL)]
ChannelsOpt = Annotated[int | None, typer.Option(metavar="N", help="Images: 1 (grayscale) or 3 (RGB) channels (default: RGB if any image is in colour).", rich_help_panel=_PANEL)]
ImageSizeOpt = Annotated[str | None, typer.Option(metavar="H,W", help="Images: resize all to H,W, e.g. 32,32 (needed when sizes differ).", rich_help_panel=_PANEL)]
# How to feed a foreign model, for every command that runs one (model_options): each is
# given once for all models, or once per model.
ModelArchOpt = Annotated[list[str] | None, typer.Option("--arch", metavar="SPEC", help="A bare state dict's network: mlp:1200,1200, or module:factory, which IMPORTS AND RUNS your code (from the working folder; your own class or function returning an nn.Module; per model).")]
InputShapeOpt = Annotated[list[str] | None, typer.Option(metavar="SHAPE", help="Per-example shape the model takes, e.g. 1,28,28 (per model).")]
ScaleOpt = Annotated[list[float] | None, typer.Option(metavar="X", help="Divide raw inputs by this (per model).")]
MeanOpt = Annotated[list[str] | None, typer.Option(metavar="M[,M...]", help="Then subtract this: one value, or one per channel or feature, comma-separated (per model).")]
StdOpt = Annotated[list[str] | None, typer.Option(metavar="S[,S...]", help="Then divide by this: one value, or one per channel or feature (per model).")]
ModelOutputOpt = Annotated[list[str] | None, typer.Option("--teacher-output", metavar="KIND", help="What the model outputs: logits, log-probs or probs (default: detected; per model).")]
OutputNameOpt = Annotated[list[str] | None, typer.Option("--output", metavar="NAME", help="Which ONNX output to use (per model).")]
TrustPickleOpt = Annotated[bool, typer.Option(help="Allow pickled nn.Modules: this RUNS CODE from the file.")]


def _option(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             annotation=annotation, default=default)


def _group(name: str, params: list[inspect.Parameter],
           build: Callable[[dict[str, Any], dict[str, Any]], Any]) -> Callable[[F], F]:
    """A decorator that puts the options ``params`` in the place of the command's parameter
    ``name``, and passes the command ``build(values, other_options)`` as ``name``.

    Raises:
        TypeError: the command has no parameter ``name``.
    """
    names = [p.name for p in params]

    def deco(fn: F) -> F:
        sig = inspect.signature(fn)
        if name not in sig.parameters:
            raise TypeError(f"{fn.__name__} has no parameter {name!r} for its options")
        new: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            new += [q.replace(kind=p.kind) for q in params] if p.name == name else [p]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names}
            return fn(*args, **kwargs, **{name: build(values, kwargs)})

        wrapper.__signature__ = sig.replace(parameters=new)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in new}
        return wrapper  # type: ignore[return-value]

    return deco


def data_options(only_given: bool = False) -> Callable[[F], F]:
    """Decorator: the table and image-folder options, passed to the command as its
    ``data_options`` parameter, a :class:`~kdcli.data.base.DataOptions` (with
    ``only_given``: None when none of them is given)."""
    params = [_option("label_column", LabelColumnOpt), _option("feature_columns", FeatureColumnsOpt),
              _option("missing", MissingOpt), _option("text_column", TextColumnOpt), _option("channels", ChannelsOpt), _option("image_size", ImageSizeOpt)]

    def build(values: dict[str, Any], _: dict[str, Any]) -> Any:
        if only_given and all(v is None for v in values.values()):
            return None
        return _data_options(**values)

    return _group("data_options", params, build)


def model_options(per: str | None = None) -> Callable[[F], F]:
    """Decorator: the options that say how to feed a model, passed to the command as its
    ``options`` parameter, one :class:`~kdcli.teachers.base.TeacherOptions` per model (one
    per item of the command's parameter ``per``; one when ``per`` is None)."""
    params = [_option("arch", ModelArchOpt), _option("input_shape", InputShapeOpt),
              _option("scale", ScaleOpt), _option("mean", MeanOpt), _option("std", StdOpt),
              _option("teacher_output", ModelOutputOpt), _option("output", OutputNameOpt),
              _option("trust_pickle", TrustPickleOpt, False)]

    def build(values: dict[str, Any], others: dict[str, Any]) -> list:
        return _teacher_options(len(others[per]) if per else 1, **values)

    return _group("options", params, build)


def train_options(defaults: TrainConfig, lr_help: str, normalize: str) -> Callable[[F], F]:
    """Decorator: the optimization options (one per :class:`~kdcli.config.TrainConfig`
    field, defaulting to ``defaults``), passed to the command as its ``config`` parameter;
    ``normalize`` says when --normalize is on by default."""
    d = defaults
    params = [_option("epochs", EpochsOpt), _option("batch_size", BatchOpt, d.batch_size),
              _option("lr", Annotated[float, typer.Option(metavar="RATE", help=lr_help)], d.lr),
              _option("optimizer", OptimizerOpt, d.optimizer),
              _option("momentum", MomentumOpt, d.momentum),
              _option("weight_decay", WeightDecayOpt, d.weight_decay),
              _option("schedule", ScheduleOpt, d.schedule), _option("warmup", WarmupOpt, d.warmup),
              _option("grad_clip", GradClipOpt, d.grad_clip),
              _option("precision", PrecisionOpt, d.precision), _option("seed", SeedOpt, d.seed),
              _option("dry_run", DryRunOpt, False), _option("stop_after", StopAfterOpt),
              _option("device", TrainDeviceOpt, d.device), _option("normalize", normalize_option(normalize)),
              _option("normalize_by", NormalizeByOpt, d.normalize_by),
              _option("max_categories", MaxCategoriesOpt, d.max_categories)]
    return _group("config", params, lambda values, _: TrainConfig(**values))


def augment_options() -> Callable[[F], F]:
    """Decorator: the augmentation options, passed to the command as its ``augmentation``
    parameter, a :class:`~kdcli.data.augment.AugmentConfig`."""
    params = [_option("jitter", JitterOpt, 0), _option("augment", AugmentOpt),
              _option("crop_pad", CropPadOpt), _option("pad_mode", PadModeOpt),
              _option("flip", FlipOpt)]

    def build(values: dict[str, Any], _: dict[str, Any]) -> Any:
        from kdcli.data.augment import AugmentConfig

        return AugmentConfig.from_options(values["augment"], jitter=values["jitter"] or None,
                                          crop_pad=values["crop_pad"],
                                          pad_mode=values["pad_mode"], flip=values["flip"])

    return _group("augmentation", params, build)


def text_augment_options() -> Callable[[F], F]:
    """Decorator: the augmentation of the copies of texts (Tang et al. 2019), passed to the
    command as its ``text_augment`` parameter, a
    :class:`~kdcli.data.text_augment.TextAugment`."""
    panel = "Text augmentation (the copies of --copies; the paper: 0.1, 0.1, 0.25)"
    params = [
        _option("word_mask", Annotated[float, typer.Option(metavar="P", help="Each word becomes [UNK] with probability P.", rich_help_panel=panel)], 0.0),
        _option("word_replace", Annotated[float, typer.Option(metavar="P", help="Each word becomes one drawn from the data's words (by count) with probability P.", rich_help_panel=panel)], 0.0),
        _option("ngram_sample", Annotated[float, typer.Option(metavar="P", help="With probability P a copy keeps only a random window of 1 to 5 words.", rich_help_panel=panel)], 0.0)]

    def build(values: dict[str, Any], _: dict[str, Any]) -> Any:
        from kdcli.data.text_augment import TextAugment

        return TextAugment(values["word_mask"], values["word_replace"], values["ngram_sample"])

    return _group("text_augment", params, build)


def words_options() -> Callable[[F], F]:
    """Decorator: a text student's vocabulary options, passed to the command as its
    ``words`` parameter, a :class:`~kdcli.config.WordsConfig`."""
    d = WordsConfig()
    panel = "Text students"
    params = [
        _option("vocab_size", Annotated[int, typer.Option(metavar="N", help="Most words in the vocabulary, fitted on the training texts.", rich_help_panel=panel)], d.vocab_size),
        _option("min_count", Annotated[int, typer.Option(metavar="N", help="Words seen fewer times are unknown.", rich_help_panel=panel)], d.min_count),
        _option("max_words", Annotated[int, typer.Option(metavar="N", help="Texts are cut after this many words (tokens with --tokenizer).", rich_help_panel=panel)], d.max_words),
        _option("tokenizer", Annotated[str | None, typer.Option(metavar="teacher|PATH", help="The teacher's subword tokenizer instead of words: teacher (the set's Hugging Face teacher, found by name beside the set), its folder (a transformer then starts from its embeddings) or a tokenizer.json.", rich_help_panel=panel)], d.tokenizer)]
    return _group("words", params, lambda values, _: WordsConfig(**values))


def output_options(quiet: bool = True) -> Callable[[F], F]:
    """Decorator: ``--json`` (and ``--quiet``, unless ``quiet`` is False), passed to the
    command as its ``rep`` parameter, the :class:`~kdcli.output.Reporter` they choose."""
    params = [_option("json_out", JsonOpt, False)]
    if quiet:
        params.append(_option("quiet", QuietOpt, False))

    def build(values: dict[str, Any], _: dict[str, Any]) -> Any:
        from kdcli.output import Reporter

        # --json --quiet: the JSON result on stdout, and nothing on stderr
        return Reporter("json" if values["json_out"] else
                        "quiet" if values.get("quiet") else "rich")

    return _group("rep", params, build)


def _data_options(label_column: str | None, feature_columns: str | None,
                  missing: str | None, text_column: str | None, channels: int | None, image_size: str | None) -> Any:
    """The :class:`~kdcli.data.base.DataOptions` of the table/image options."""
    from kdcli.data.base import DataOptions

    size = ints(image_size, "--image-size")
    if size is not None and len(size) == 1:
        size = size * 2
    columns = [c.strip() for c in feature_columns.split(",") if c.strip()] \
        if feature_columns is not None else None
    texts = tuple(c.strip() for c in text_column.split(",")) if text_column is not None else None
    opts = DataOptions(label_column=label_column or None,
                       feature_columns=tuple(columns) if feature_columns is not None else None,
                       text_columns=texts, missing=missing,
                       channels=channels, image_size=tuple(size) if size else None)
    opts.check()
    return opts


def _teacher_options(count: int, *, arch: list[str] | None, input_shape: list[str] | None,
                     scale: list[float] | None, mean: list[str] | None,
                     std: list[str] | None, teacher_output: list[str] | None,
                     output: list[str] | None, trust_pickle: bool) -> list:
    """One :class:`~kdcli.teachers.base.TeacherOptions` per model from the model options.

    Raises:
        UsageError: an option was given neither once nor once per model.
    """
    from kdcli.checks import check_preprocessing_options, parse_shape
    from kdcli.teachers.base import TeacherOptions

    per = {"arch": arch, "input_shape": input_shape, "scale": scale, "mean": mean, "std": std,
           "teacher_output": teacher_output, "output": output}
    for flag, values in per.items():
        if values and len(values) not in (1, count):
            raise UsageError(f"--{flag.replace('_', '-')} was given {len(values)} times for "
                             f"{count} models", "Give it once for all models, or once per model")

    def pick(values: list | None, i: int) -> Any:
        return values[i if len(values) > 1 else 0] if values else None

    for a in arch or []:
        check_arch_spec(a, student=False)
    for i in range(count):
        check_preprocessing_options(pick(scale, i), _stats(pick(mean, i), "--mean"),
                                    _stats(pick(std, i), "--std"))
    return [TeacherOptions(arch=pick(arch, i),
                           input_shape=parse_shape(pick(input_shape, i)) if input_shape else None,
                           scale=pick(scale, i), mean=_stats(pick(mean, i), "--mean"),
                           std=_stats(pick(std, i), "--std"), output=pick(teacher_output, i),
                           output_name=pick(output, i), trust_pickle=trust_pickle)
            for i in range(count)]


def ints(text: str | None, flag: str) -> list[int] | None:
    """The comma-separated integers of option ``flag`` (None when not given).

    Raises:
        UsageError: an item is not an integer.
    """
    return _numbers(text, flag, int, "integers, e.g. {flag} 7,8")


def floats(text: str | None, flag: str) -> list[float] | None:
    """The comma-separated numbers of option ``flag`` (None when not given).

    Raises:
        UsageError: an item is not a number.
    """
    return _numbers(text, flag, float, "numbers, e.g. {flag} 0.5,0.5")


def _numbers(text: str | None, flag: str, kind: type, example: str) -> list | None:
    items = split_list(text, flag)
    if items is None:
        return None
    try:
        return [kind(v) for v in items]
    except ValueError as e:
        raise UsageError(f"bad {flag} {text!r}",
                         "Use comma-separated " + example.format(flag=flag)) from e


def _stats(text: str | None, flag: str) -> float | list[float] | None:
    """One ``--mean``/``--std`` value, or a comma-separated list (per channel or feature)."""
    values = floats(text, flag)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def architecture(arch: str | None, hidden: int | None, layers: int | None,
                 defaults: tuple[int, int], **kw: Any) -> Any:
    """The :class:`~kdcli.students.base.Architecture` of --arch, or of --hidden/--layers
    (``defaults`` when not given).

    Raises:
        UsageError: --arch conflicts with --hidden/--layers, or a value is out of range.
    """
    from kdcli.students.base import Architecture

    if check_arch_spec(arch):
        given = [f for f, v in (("--hidden", hidden), ("--layers", layers)) if v is not None]
        if given:
            raise UsageError(f"--arch {arch} conflicts with {' and '.join(given)}",
                             "Give the widths in --arch (e.g. mlp:300,300), or drop --arch")
        return Architecture.parse(arch, **kw)
    hidden = defaults[0] if hidden is None else hidden
    layers = defaults[1] if layers is None else layers
    if not 0 <= layers <= 64:
        raise UsageError(f"--layers must be from 0 to 64, got {layers}", "Try --layers 2")
    check_width(hidden)
    a = Architecture("mlp", hidden=[hidden] * layers, **kw)
    a.check()
    return a
