"""``kdcli calibrate-bias``: shift the student's output biases to match a class distribution.

A student whose transfer set lacked some classes (the paper's "digit 3 left out" experiment)
rarely predicts them, although its weights learned them from the teacher's soft targets. The
paper fixed this by raising the missing class's bias by hand (+3.5). This fits the shifts
automatically, without labels of the missing classes: one bias shift ``b_c`` per class such
that the student's mean predicted distribution on a set of inputs equals a target ``pi``:

    mean_n softmax(z_n + b) = pi

``pi`` is the teacher's mean prediction at T = 1 on those inputs (``--teacher``, or the
transfer set's stored logits), or the label frequencies. It is solved by the fixed-point
iteration ``b <- b + log(pi) - log(mean_n softmax(z_n + b))`` (the prior-shift update of
Saerens et al., 2002), which converges monotonically.

A text student (a model with a word vocabulary) is calibrated on texts alike: its logits
are those of the texts' word ids by its vocabulary, and its shifted file still exports to an
ONNX graph that takes strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdcli.data.base import table_columns
from kdcli.errors import DataError, UsageError
from kdcli.io.files import atomic_output, check_output, data_files
from kdcli.output import Reporter

if TYPE_CHECKING:
    from kdcli.data.base import DataOptions


def fit_bias_shift(logits: torch.Tensor, target: torch.Tensor, free: list[int] | None = None,
                   iterations: int = 500, tol: float = 1e-6) -> tuple[torch.Tensor, int]:
    """Solve ``mean_n softmax(logits_n + b) = target`` for ``b``.

    Args:
        logits: ``[N, C]`` student logits.
        target: ``[C]`` target distribution (positive, sums to 1).
        free: Classes whose bias may move (None: all). The others keep ``b = 0``; then the
            target is matched for the free classes only.
        iterations: Maximum fixed-point steps.
        tol: Stop when ``max |mean softmax - target|`` over free classes is below this.

    Returns:
        ``(b [C], steps)``. With all classes free, ``b`` is shifted so its median is 0 (a
        constant shift does not change softmax), so untouched classes read about 0.
    """
    z = logits.double()
    pi = target.double()
    mask = torch.zeros(z.shape[1], dtype=torch.bool)
    mask[free if free is not None else slice(None)] = True
    b = torch.zeros(z.shape[1], dtype=torch.float64)
    steps = 0
    while steps < iterations:
        p = torch.softmax(z + b, -1).mean(0)
        if float((p - pi)[mask].abs().max()) < tol:
            break
        b = b + torch.where(mask, pi.log() - p.log(), 0.0)
        steps += 1
    if free is None:
        b = b - b.median()
    return b.float(), steps


def calibrate_bias(model: str | Path = "student.safetensors",
                   out: str | Path = "calibrated.safetensors", *, data: str | None = None,
                   teacher: str | Path | None = None, transfer: str | Path | None = None,
                   target: str = "teacher", classes: list[int] | None = None,
                   eval_data: str | None = None, options: Any = None, force: bool = False,
                   reporter: Reporter | None = None,
                   data_options: DataOptions | None = None) -> dict[str, Any]:
    """Fit per-class bias shifts for a kdcli model and write the shifted model.

    Args:
        model: The kdcli model file to correct (normally a student).
        out: Where to write the corrected model.
        data: Inputs to match the distribution on (labels unused unless ``target='labels'``);
            default: the model's training data source if it is bundled with kdcli (a
            recorded path is refused: name it again).
        teacher: A teacher (any format) whose mean prediction at T = 1 on ``data`` is the
            target.
        transfer: Or a transfer set whose stored logits give the target on its own inputs.
        target: ``teacher`` or ``labels`` (the label frequencies of ``data``).
        classes: Only these classes' biases may move (default: all).
        eval_data: Labelled data to report test errors before and after.
        options: How to feed ``teacher`` (:class:`kdcli.teachers.base.TeacherOptions`).
        force: Overwrite ``out``.
        reporter: Output sink.
        data_options: How a table or image folder is read (default: as the model records).

    Returns:
        The fitted shifts, the distributions before and after, and the errors if evaluated.
    """
    from kdcli.evaluate import predict
    from kdcli.students.base import final_linear
    from kdcli.students.model_file import load_model, save_model

    rep = reporter or Reporter()
    if target not in ("teacher", "labels"):
        raise UsageError(f"unknown --target {target!r}", "Use teacher or labels")
    if target == "teacher" and (teacher is None) == (transfer is None):
        raise UsageError("--target teacher needs exactly one of --teacher or --transfer",
                         "Pass --teacher teacher.safetensors (and --data), or --transfer FILE")
    check_output(out, force, inputs=[p for p in (model, teacher, transfer) if p is not None]
                 + data_files(data) + data_files(eval_data))
    mf = load_model(model)
    c = mf.num_classes
    if classes is not None and any(not 0 <= k < c for k in classes):
        raise UsageError(f"--classes {classes} is outside 0..{c - 1}", "Name existing classes")

    inputs, pi, source = _target(mf, data, teacher, transfer, target, options, data_options, rep)
    logits = predict(mf.model, inputs)
    before = torch.softmax(logits.double(), -1).mean(0)
    shift, steps = fit_bias_shift(logits, pi, classes)
    after = torch.softmax(logits.double() + shift.double(), -1).mean(0)

    result: dict[str, Any] = {"model": str(model), "out": str(out), "source": source,
                              "target": target, "shifts": shift.tolist(), "steps": steps,
                              "target_distribution": pi.tolist(),
                              "before": before.tolist(), "after": after.tolist()}
    evaluated = _evaluate(mf, eval_data, shift, data_options) if eval_data else {}
    if evaluated:
        result["eval"] = evaluated

    with torch.no_grad():
        final_linear(mf.model).bias.add_(shift)
    training = {**mf.training, "bias_shift": {"shifts": [round(v, 4) for v in shift.tolist()],
                                              "target": target, "source": source}}
    if evaluated:
        training.update(test_errors=evaluated["after"]["errors"], test_data=eval_data)
    with atomic_output(out, force) as tmp:
        save_model(tmp, mf.model, mf.arch, mf.preprocessing, c, training,
                   class_names=mf.class_names, feature_names=mf.feature_names)
    _show(result, evaluated, c, steps, rep)
    return result


def _target(mf, data: str | None, teacher: str | Path | None, transfer: str | Path | None,
            target: str, options: Any, data_options: DataOptions | None,
            rep: Reporter) -> tuple[Any, torch.Tensor, str]:
    """The inputs to match on (as the model takes them: see :func:`_model_inputs`), the
    target distribution ``pi`` over the classes (refused unless every class has some
    probability) and a description of the inputs."""
    from kdcli.data.base import no_labels
    from kdcli.data.base import recorded_options as _options
    from kdcli.data.sources import load_data, recorded_data
    from kdcli.evaluate import predict
    from kdcli.teachers.formats import load_teacher
    from kdcli.transfer.reader import load_transfer_set

    c = mf.num_classes
    if transfer is not None:
        ts = load_transfer_set(transfer)
        source = f"transfer set {Path(transfer).name}"
        inputs = _model_inputs(mf, ts.texts(slice(0, len(ts))) if ts.is_text
                               else ts.columns["inputs"], str(transfer),
                               ts.meta.get("feature_names"), ts.meta.get("categories"))
        pi = ts.mean_targets(1.0)
    else:
        spec = data or recorded_data(mf.training, "data") or "mnist:train"
        ds = load_data(spec, options=_options(data_options, mf.training))
        inputs, source = _model_inputs(mf, ds.inputs, ds.source, ds.feature_names,
                                       ds.categories), ds.source
        if target == "labels":
            if ds.labels is None:
                raise no_labels(ds, "use --target teacher to match the teacher instead")
            pi = torch.bincount(ds.labels, minlength=c).double() / len(ds)
        else:
            t = load_teacher(teacher, options, probe=ds.inputs[:1000],
                             table=table_columns(ds, data_options))
            with rep.progress("teacher", len(ds)) as advance:
                def run(x, advance=advance):
                    advance(len(x))
                    return t.logits(x)
                pi = torch.softmax(predict(run, ds.inputs), -1).mean(0)
            if t.num_classes != c:
                raise UsageError(f"the teacher has {t.num_classes} classes, the model {c}",
                                 "Use the student's own teacher")
    if not bool((pi > 0).all()):
        raise DataError(f"the target gives classes {(pi <= 0).nonzero()[:, 0].tolist()} no "
                        "probability", "Use data in which every class can occur")
    return inputs, pi, source


def _model_inputs(mf, inputs: Any, source: str, names: list[str] | None = None,
                  categories: dict[str, list[str]] | None = None) -> Any:
    """What the model ``mf`` takes of ``inputs``: a text student's word ids of texts (by
    its vocabulary), a table student's columns by name (``names``, the data's) with its own
    category codes (``categories``, the data's), other inputs as they are; refused where the
    kinds differ.

    Raises:
        UsageError: a text student on other data, or another model on texts.
        DataError: the data lacks a column of the table student.
    """
    from kdcli.data.text import Texts
    from kdcli.training.text import check_kind, encode

    text = isinstance(inputs, Texts)
    check_kind(mf.arch, text, source, ("Calibrate it on the kind of data it was trained on",
                                       "Calibrate a text student on texts"))
    if text:
        return encode(inputs.strings(), mf.preprocessing)
    if mf.preprocessing.table is None:
        from kdcli.training.table import refuse_gaps

        refuse_gaps(inputs, names, source, "the model")
        return inputs
    from kdcli.students.table_encoding import TableEncoding
    from kdcli.teachers.inputs import match_columns

    enc = TableEncoding.from_json(mf.preprocessing.table)
    rows = inputs[slice(0, len(inputs))]
    order = match_columns(enc.names, names, f"model {mf.arch.spec()}")
    return enc.recode(rows if order is None else rows[:, list(order)], categories)


def _evaluate(mf, eval_data: str, shift: torch.Tensor,
              data_options: DataOptions | None) -> dict[str, Any]:
    """Errors on ``eval_data`` (in all and per class) before and after the shift."""
    from kdcli.data.base import no_labels
    from kdcli.data.base import recorded_options as _options
    from kdcli.data.sources import load_data
    from kdcli.evaluate import classification_metrics, predict

    ev = load_data(eval_data, options=_options(data_options, mf.training))
    if ev.labels is None:
        raise no_labels(ev, "give labelled --eval-data")
    z = predict(mf.model, _model_inputs(mf, ev.inputs, ev.source, ev.feature_names,
                                        ev.categories))
    evaluated: dict[str, Any] = {"data": ev.source}
    for name, zz in (("before", z), ("after", z + shift)):
        m = classification_metrics(zz, ev.labels)
        per_class = [int(((zz.argmax(-1) != ev.labels) & (ev.labels == k)).sum())
                     for k in range(mf.num_classes)]
        evaluated[name] = {"errors": m["errors"], "errors_per_class": per_class}
    return evaluated


def _show(result: dict[str, Any], evaluated: dict[str, Any], c: int, steps: int,
          rep: Reporter) -> None:
    """The table of shifts and distributions (and errors, if evaluated) per class."""
    shift, pi = result["shifts"], result["target_distribution"]
    before, after = result["before"], result["after"]
    rows = [[k, f"{shift[k]:+.2f}", f"{100 * pi[k]:.2f}%", f"{100 * before[k]:.2f}%",
             f"{100 * after[k]:.2f}%"] + ([evaluated["before"]["errors_per_class"][k],
                                            evaluated["after"]["errors_per_class"][k]]
                                           if evaluated else [])
            for k in range(c)]
    cols = ["class", "bias shift", "target", "before", "after"]
    if evaluated:
        cols += ["errors before", "errors after"]
        rows.append(["all", "", "", "", "", evaluated["before"]["errors"],
                     evaluated["after"]["errors"]])
    rep.table(f"Bias shifts fitted on {result['source']} ({steps} steps), written to "
              f"{result['out']}", cols, rows)
