"""Settle what a teacher's file does not say (input shape, output kind, classes) on a probe batch.

:func:`settle` takes the provisional spec a format's loader returns and gives the final one,
made once with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from kdcli.data.text import Texts
from kdcli.errors import KdcliError, ModelError, first_line
from kdcli.resources import check_memory
from kdcli.teachers.base import NotScoresError, RawBatch, Teacher, detect_output_kind

# The hint when a teacher fails on table rows: their columns, not a shape, are what to change.
_TABLE_HINT = ("Check that the table has the columns the teacher was trained on, in its "
               "order; choose them with --feature-columns")
# What a text model is probed with when no data is given: two short texts.
PROBE_TEXTS = ("a short probe text", "another one")


def settle(t: Teacher, probe: RawBatch | None) -> Teacher:
    """The final spec: ``t`` with its input shape, output kind and class count settled.

    Args:
        t: The provisional spec from a format's loader.
        probe: A few raw examples (None: random inputs of the file's own input shape, or
            two short texts for a text model).

    Raises:
        ModelError: the shape is unknown, the model fails on the probe, or its output does
            not fit its classes.
    """
    text_data = probe is not None and not isinstance(probe, torch.Tensor)  # Texts, a list
    if probe is not None and text_data != t.takes_text:
        raise ModelError(f"teacher {t.name} takes text, but the data holds examples of shape "
                         f"{list(probe.shape[1:])}" if t.takes_text else
                         f"teacher {t.name} takes examples of shape "
                         f"{list(t.input_shape or ['?'])}, but the data holds texts",
                         "Give text data (a table with --text-column, or a folder of .txt "
                         "files)" if t.takes_text else "Give a text teacher (a Hugging Face "
                         "text classifier, an ONNX text pipeline) or numeric data")
    if t.takes_text:
        probe = probe.strings() if isinstance(probe, Texts) else \
            list(probe if probe is not None else PROBE_TEXTS)
        shape = t.input_shape
    else:
        probe, shape = _tensor_probe(t, probe)
    try:
        out = t.check_output(t.forward(t.prepare(probe, shape)), len(probe))
    except KdcliError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own error, on its own inputs
        what = "texts" if t.takes_text else f"examples of shape {shape}"
        hint = ("Check the data" if t.takes_text else _TABLE_HINT if len(shape) == 1
                and probe.dim() == 2 else "Check --input-shape and the data")
        raise ModelError(f"teacher {t.name} fails on {what} ({first_line(e)})", hint) from e
    notes, output = list(t.notes), t.output
    if output is None:
        output = detect_output_kind(out)
        if output != "logits":
            notes.append(f"{t.name}: outputs look like {output}; "
                         f"converted to logits (override with --teacher-output)")
    width = int(out.shape[1])
    if width == 0:
        raise ModelError(f"teacher {t.name} returns no class scores (shape "
                         f"{tuple(out.shape)})", "The model must output at least one score "
                         "per example")
    binary = width == 1
    if binary:
        notes.append(f"{t.name}: one output column ({output}); read as a binary "
                     "classifier with two classes")
    c = 2 if binary else width
    if t.num_classes is not None and t.num_classes != c:
        raise ModelError(f"teacher {t.name} says it has {t.num_classes} classes but "
                         f"outputs {width} columns", "Check the model's configuration")
    names = t.class_names if t.class_names is None or len(t.class_names) == c else None
    return replace(t, inputs=t.with_input_shape(shape), output=output, notes=tuple(notes),
                   binary=binary, num_classes=c, class_names=names)


def _tensor_probe(t: Teacher, probe: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
    """The probe batch of a model of tensors (random inputs of its shape when none is given)
    and the per-example shape it takes, tried on the probe when the file does not say."""
    _check_batch_memory(t, 2 if probe is None else int(probe.shape[0]))
    if probe is None:
        if t.input_shape is None:
            raise ModelError(f"the input shape of teacher {t.name} is not known",
                             "Pass --input-shape (or give example inputs to probe it)")
        gen = torch.Generator().manual_seed(0)
        scale = t.preprocessing.scale
        probe = torch.rand((2, *t.input_shape), generator=gen) * scale
    return probe, t.input_shape or _resolve_input_shape(t, probe[:2])


def _check_batch_memory(t: Teacher, rows: int) -> None:
    """Refuse a teacher whose batch of model inputs cannot fit in memory, before the probe
    allocates it (a fixed batch of millions, an image size of 100,000 pixels a side)."""
    shape, size = t.input_shape, t.preprocessing.size
    if not shape:
        return
    elems = math.prod(shape[:1]) * math.prod(size) if size else math.prod(shape)
    rows = max(rows, t.fixed_batch or 0)
    hint = (f"The model takes only batches of {t.fixed_batch:,}: export it with a dynamic or "
            "smaller batch" if t.fixed_batch and t.fixed_batch == rows else
            "Its input size (the image or crop size of its configuration, or --input-shape) is "
            "too large; check the file")
    where = [*shape[:1], *size] if size else shape
    check_memory(2 * 4 * rows * elems, f"teacher {t.name}'s batch of {rows:,} inputs of shape "
                 f"{where}", hint)


def _resolve_input_shape(t: Teacher, probe: torch.Tensor) -> list[int]:
    """The per-example input shape the model takes, trying the likely ones."""
    sample = [len(t.columns)] if t.columns is not None else list(probe.shape[1:])
    n = math.prod(sample)
    candidates = [sample, [n], [1, *sample]] if len(sample) > 1 else [sample, [1, *sample]]
    first_err = None
    for cand in candidates:
        try:
            t.check_output(t.forward(t.prepare(probe, cand)), probe.shape[0])
            return cand
        except NotScoresError:
            raise  # the model ran: its shape is right, its output is not scores
        except Exception as e:  # noqa: BLE001 - any failure means "not this shape"
            first_err = first_err or e
    msg = first_line(first_err) if first_err else "unknown"
    if len(sample) == 1:  # table rows: the columns, not a shape, are what to change
        raise ModelError(f"teacher {t.name} fails on rows of {n} columns ({msg})",
                         "Check that the table has the columns the teacher was trained on, "
                         "in its order; choose them with --feature-columns")
    raise ModelError(
        f"teacher {t.name} fails on examples of shape {sample} ({msg})",
        "Pass --input-shape with the per-example shape the model expects, "
        f"e.g. --input-shape {n} or --input-shape 1,{','.join(map(str, sample))}")
