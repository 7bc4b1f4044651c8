"""``kdcli sweep``: train-student over a grid of temperatures and widths against one teacher.

The transfer set is derived once; each temperature re-derives its soft targets exactly from
the stored logits. The students are MLPs (``--family mlp``, ``--layers`` hidden layers of
each width), or, on texts, a text family (``--family bow``, ``bilstm``, ``kimcnn`` or
``transformer``, the width being ``bow:D``'s D, ``bilstm:H``'s H, ``kimcnn:F``'s F or
``transformer:L,D``'s D with ``--layers`` L) trained with the family's own optimizer and
learning rate unless given; the vocabulary (or the subword tokenizer, ``--tokenizer``) is
fitted once on the transfer set's texts and shared by every student; ``--tokenizer
teacher`` is the sweep's teacher folder's. With several seeds, every grid point is trained
once per seed and reported as mean ± sample standard deviation, so the seed noise is
visible next to the effect of T.
Finished students are kept, so an interrupted sweep resumes where it stopped. Results go to
``OUT_DIR/results.json`` and, with matplotlib installed (``pip install kdcli[plot]``), a plot
of test errors against T, one line per width (error bars with several seeds).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.config import SWEEP_ALPHA, DistillConfig, TrainConfig, WordsConfig, student_config
from kdcli.errors import UsageError
from kdcli.io.files import folder_write_error
from kdcli.output import Reporter

if TYPE_CHECKING:
    from kdcli.data.base import DataOptions
    from kdcli.students.base import Architecture
    from kdcli.transfer.reader import TransferSet

#: The hints of the error that refuses a family of the other kind than the transfer set's.
_KIND_FIX = ("Use --family mlp for images and tables", "Use a text student, e.g. --family bow")


def sweep(teacher: str | Path, *, temperatures: list[float], hidden: list[int],
          layers: int = 2, data: str = "mnist:train", distill: DistillConfig | None = None,
          config: TrainConfig | None = None, seeds: list[int] | None = None,
          eval_data: str | None = "auto", out_dir: str | Path = "sweep",
          force: bool = False, reporter: Reporter | None = None,
          data_options: DataOptions | None = None, family: str = "mlp",
          words: WordsConfig | None = None) -> dict[str, Any]:
    """Run the grid and return ``{"points": [...], "summary": [...], "plot": path or None}``.

    ``points`` has one entry per student (width, T, seed); ``summary`` one per grid point,
    with the mean and sample standard deviation of the test errors over the seeds.

    Args:
        teacher: The teacher model file (any format kdcli loads).
        temperatures: The T values.
        hidden: The student widths (MLPs of ``layers`` hidden layers; a text family's D or
            H).
        layers: Hidden layers of each MLP student (a transformer student's layers).
        data: Transfer data.
        distill: Each student's distillation settings, without T (default: alpha
            :data:`~kdcli.config.SWEEP_ALPHA`, the kd loss); T is each of ``temperatures``.
        config: Each student's optimization settings (default:
            :func:`kdcli.train.student_config`); its seed is replaced by each of ``seeds``.
        seeds: Seeds; each grid point trains one student per seed (default ``[0]``).
        eval_data: Data for test errors (``auto``: mnist:test for MNIST).
        out_dir: Folder for the transfer set, students, results and plot.
        force: Start afresh: delete what an earlier sweep left in ``out_dir``.
        reporter: Output sink.
        data_options: How a table or image folder given as ``data`` or ``eval_data`` is
            read (``text_columns`` for texts).
        family: The students' family: ``mlp``, or on texts ``bow``, ``bilstm`` or
            ``transformer``.
        words: The text students' vocabulary settings, fitted once for all of them
            (``tokenizer="teacher"``: the tokenizer of ``teacher``, a Hugging Face folder).
    """
    from kdcli.training.text import family_defaults, fit_transfer_words
    from kdcli.transfer.reader import load_transfer_set

    rep = reporter or Reporter()
    distill = distill or DistillConfig(alpha=SWEEP_ALPHA)
    seeds = _check_grid(temperatures, hidden, layers, [0] if seeds is None else seeds, distill,
                        family)
    words = _teacher_tokenizer(words or WordsConfig(), teacher)
    words.check()
    config = config or student_config()
    config.check()
    folder = _folder(out_dir, force)
    config, precision_shown = _concrete_precision(config)
    made = not (folder / "transfer.safetensors").exists()
    transfer = _transfer_set(folder, teacher, data, temperatures[0], data_options, rep, config)
    ts = load_transfer_set(transfer)
    first = _arch(family, hidden[0], layers)
    _check_family(ts, first, made)
    config = family_defaults(config, first, student_config(), rep)
    config = config.resolved(len(ts))
    fitted = fit_transfer_words(ts, words, rep) if ts.is_text else None
    points = []
    # Seeds outermost: an interrupted sweep has whole grids for its first seeds.
    grid = [(h, t, s) for s in seeds for h in hidden for t in temperatures]
    with rep.progress("sweep (students)", len(grid)) as advance:
        for h, t, s in grid:
            point = _student(folder, transfer, _arch(family, h, layers), (h, t, s),
                             distill=distill, config=config, eval_data=eval_data,
                             data_options=data_options,
                             text=(words, fitted) if fitted is not None else None)
            points.append(point)
            rep.info(f"hidden {h:>5}  T {t:>5g}  seed {s}  test errors {point['test_errors']}"
                     f"  ({point['status']})")
            advance(1)
    summary = _summarize(points, hidden, temperatures)
    (folder / "results.json").write_text(json.dumps(
        {"teacher": str(teacher), "alpha": distill.alpha,
         **{k: v for k, v in config.settings().items() if k != "seed"}, "seeds": seeds,
         "points": points, "summary": summary}, indent=2))
    plot = _plot(summary, folder / "sweep.png", rep)
    _show_table(summary, hidden, temperatures, seeds, folder, rep, precision_shown)
    return {"points": points, "summary": summary, "plot": str(plot) if plot else None,
            "results": str(folder / "results.json")}


def _check_grid(temperatures: list[float], hidden: list[int], layers: int, seeds: list[int],
                distill: DistillConfig, family: str = "mlp") -> list[int]:
    """Refuse an empty or out-of-range grid; return the seeds."""
    from kdcli.checks import check_seeds, check_temperature

    if not temperatures or not hidden:
        raise UsageError("the grid is empty", "Pass --T 2,4,8 and --hidden 30,300")
    for t in temperatures:
        check_temperature(t)
    if any(h <= 0 for h in hidden):
        raise UsageError(f"--hidden widths must be positive, got {hidden}", "e.g. 30,300")
    check_seeds(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must be distinct integers, got {seeds}", "e.g. --seeds 0,1")
    if distill.T is not None:
        raise UsageError("sweep takes its temperatures from --T, not from its DistillConfig",
                         "Leave DistillConfig.T None")
    distill.check()
    if not 0 <= layers <= 64:
        raise UsageError(f"--layers must be from 0 to 64, got {layers}", "Try --layers 2")
    for h in hidden:
        _arch(family, h, layers).check()
    return seeds


def _arch(family: str, h: int, layers: int) -> Architecture:
    """The student of width ``h``: an MLP of ``layers`` hidden layers, a transformer of
    ``layers`` layers (``transformer:layers,h``), or ``family:h``."""
    from kdcli.students.base import Architecture

    if family == "mlp":
        return Architecture("mlp", hidden=[h] * layers)
    if family == "transformer":  # transformer:L,D: its width is the second number
        return Architecture.parse(f"{family}:{layers},{h}")
    return Architecture.parse(f"{family}:{h}")


def _teacher_tokenizer(words: WordsConfig, teacher: str | Path) -> WordsConfig:
    """``words`` with ``--tokenizer teacher`` made the sweep's teacher folder: the set is in
    ``--out-dir``, where the teacher's name alone finds no folder."""
    if words.tokenizer == "teacher" and Path(teacher).is_dir():
        return replace(words, tokenizer=str(teacher))
    return words


def _check_family(ts: TransferSet, arch: Architecture, made: bool) -> None:
    """Refuse students of another kind than the set's examples (texts or tensors), with the
    set removed if this sweep ``made`` it."""
    from kdcli.training.text import check_kind

    try:
        check_kind(arch, ts.is_text, str(ts.path), _KIND_FIX)
    except UsageError:
        if made:
            ts.path.unlink(missing_ok=True)
        raise


def _folder(out_dir: str | Path, force: bool) -> Path:
    """The sweep's folder, made if missing; with ``force``, emptied of an earlier sweep."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out-dir {folder} is a file", "Give a folder (it is created if "
                         "missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise folder_write_error(folder, e, f"cannot create --out-dir {folder}",
                                 "Choose a writable --out-dir") from e
    if force:
        for old in [folder / "transfer.safetensors", *folder.glob("student-h*-T*.safetensors*"),
                    folder / "results.json", folder / "sweep.png"]:
            old.unlink(missing_ok=True)
    return folder


def _concrete_precision(config: TrainConfig) -> tuple[TrainConfig, str]:
    """``config`` with ``precision="auto"`` made concrete for its device, so that the
    teacher pass and every student run at the same precision; and how the table says it."""
    from kdcli.checks import precision_note, resolve_device, resolve_precision

    dev = resolve_device(config.device)
    chosen = resolve_precision(config.precision, dev)[0]
    return replace(config, precision=chosen), precision_note(config.precision, dev) or chosen


def _transfer_set(folder: Path, teacher: str | Path, data: str, T: float,
                  data_options: DataOptions | None, rep: Reporter, config: TrainConfig) -> Path:
    """The sweep's transfer set: an earlier sweep's, if it has the same teacher and data,
    else a new one at ``T``."""
    from kdcli.soft_targets import soft_targets
    from kdcli.teachers.formats import find_format
    from kdcli.transfer.reader import load_transfer_set

    transfer = folder / "transfer.safetensors"
    if not transfer.exists():
        soft_targets([teacher], T=T, data=data, out=transfer, reporter=Reporter("quiet"),
                     data_options=data_options, device=config.device,
                     precision=config.precision)
        return transfer
    old_meta = load_transfer_set(transfer).meta
    # the digest the set records: a file's SHA-256, a Hugging Face folder's over its files
    teacher_sha = find_format(Path(teacher)).digest(Path(teacher))
    recorded = [t["sha256"] for t in old_meta["teachers"]]
    if recorded != [teacher_sha]:
        raise UsageError(f"{transfer} was made from another teacher",
                         "Use a new --out-dir, or pass --force to start afresh")
    if old_meta.get("data_source") != data:
        raise UsageError(f"{transfer} was made from --data {old_meta.get('data_source')}, "
                         f"not {data}", "Use a new --out-dir, or pass --force to start "
                         "afresh")
    made_at = old_meta.get("precision", "fp32")  # sets from before auto were fp32
    if made_at != config.precision:
        raise UsageError(f"{transfer} was made at --precision {made_at}, and this sweep runs "
                         f"at {config.precision}", f"Pass --precision {made_at}, use a new "
                         "--out-dir, or pass --force to start afresh")
    rep.info(f"reusing {transfer}")
    return transfer


def _student(folder: Path, transfer: Path, arch: Architecture, point: tuple[int, float, int],
             *, distill: DistillConfig, config: TrainConfig, eval_data: str | None,
             data_options: DataOptions | None,
             text: tuple[WordsConfig, Any] | None = None) -> dict[str, Any]:
    """One grid point's student ``arch`` of width ``h`` at T ``t`` and seed ``s``
    (``point``): kept from an earlier sweep, or trained now. ``text``: a set of texts'
    vocabulary settings and its word ids and vocabulary, fitted once for every student."""
    from kdcli.students.model_file import load_model
    from kdcli.train import train_student

    h, t, s = point
    out = folder / f"student-h{h}-T{t:g}-s{s}.safetensors"
    cfg = replace(config, seed=s)
    words, fitted = text or (None, None)
    if out.exists():
        training = load_model(out).training
        _check_kept(out, training, {"architecture": arch.spec(), "T": t,
                                    "alpha": distill.alpha, "loss": distill.loss,
                                    **cfg.settings(), **(words.settings() if words else {})})
        status = "kept"
    else:
        # force: out does not exist; a checkpoint of an interrupted student
        # (the sweep's own file) is restarted
        training = train_student(transfer, arch=arch, distill=replace(distill, T=t), out=out,
                                 eval_data=eval_data, reporter=Reporter("quiet"),
                                 config=cfg, force=True, data_options=data_options,
                                 words=words, fitted=fitted)
        status = "trained"
    return {"hidden": h, "T": t, "seed": s, "architecture": arch.spec(),
            "test_errors": training.get("test_errors"),
            "test_accuracy": training.get("test_accuracy"), "file": str(out), "status": status}


def _show_table(summary: list[dict], hidden: list[int], temperatures: list[float],
                seeds: list[int], folder: Path, rep: Reporter, precision: str) -> None:
    """The test errors: a row per width, a column per T."""
    cols = ["hidden", *(f"T={t:g}" for t in temperatures)]
    cell = {(g["hidden"], g["T"]): _cell(g) for g in summary}
    rows = [[h, *(cell[h, t] for t in temperatures)] for h in hidden]
    title = f"Test errors of distilled students ({folder}, {precision})"
    if len(seeds) > 1:
        title += f": mean ± sd over seeds {','.join(map(str, seeds))}"
    rep.table(title, cols, rows)


def _check_kept(out: Path, training: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to keep a finished student that was trained with other settings."""
    # A setting a file does not record (warmup, in files from before it
    # existed) had its default value.
    recorded = {**TrainConfig().settings(), "loss": DistillConfig().loss, **training}
    diff = [f"{k} {recorded.get(k)} (now {v})" for k, v in wanted.items()
            if recorded.get(k) != v]
    if diff:
        raise UsageError(f"{out} was trained with other settings: {', '.join(diff)}",
                         "Use a new --out-dir, or pass --force to start afresh")


def _summarize(points: list[dict], hidden: list[int], temperatures: list[float]) -> list[dict]:
    """One entry per grid point: mean and sample sd of the test errors over its seeds."""
    out = []
    for h in hidden:
        for t in temperatures:
            errs = [p["test_errors"] for p in points if p["hidden"] == h and p["T"] == t
                    and p["test_errors"] is not None]
            out.append({"hidden": h, "T": t, "test_errors": errs,
                        "mean": statistics.mean(errs) if errs else None,
                        "sd": statistics.stdev(errs) if len(errs) > 1 else None})
    return out


def _cell(g: dict) -> str:
    if g["mean"] is None:
        return "—"
    if g["sd"] is None:
        return f"{g['mean']:g}"
    return f"{g['mean']:.1f} ± {g['sd']:.1f}"


def _plot(summary: list[dict], path: Path, rep: Reporter) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        rep.warn("matplotlib is not installed, so no plot: pip install 'kdcli[plot]'")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for h in sorted({g["hidden"] for g in summary}):
        pts = sorted((g["T"], g["mean"], g["sd"] or 0.0) for g in summary
                     if g["hidden"] == h and g["mean"] is not None)
        ax.errorbar([t for t, _, _ in pts], [m for _, m, _ in pts],
                    yerr=[sd for _, _, sd in pts], marker="o", capsize=3, label=f"{h} units")
    ax.set_xscale("log")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test errors")
    ax.set_title("Distilled students: test errors against T")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
