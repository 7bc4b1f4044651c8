"""onnxruntime sessions for ONNX teachers: opening one (external data kept inside the model's
folder, a missing StringNormalizer locale replaced in memory) and running it with a time limit
that a signal or KDCLI_ONNX_TIMEOUT can cut short."""

from __future__ import annotations

import math
import os
import signal
import stat
import threading
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from onnx import TensorProto, external_data_helper

from kdcli.errors import FormatError, ModelError, first_line, quote_name
from kdcli.io.files import inside_folder, signals_raise_here
from kdcli.teachers.onnx_text import (
    is_locale_error,
    onnxruntime_cause,
    session_with_fallback_locale,
)

# Seconds one onnxruntime run may take before it is stopped (KDCLI_ONNX_TIMEOUT overrides).
RUN_TIMEOUT_S = 600.0


def run_timeout() -> float:
    """Seconds one onnxruntime run may take: ``KDCLI_ONNX_TIMEOUT``, default 600."""
    try:
        limit = float(os.environ.get("KDCLI_ONNX_TIMEOUT", RUN_TIMEOUT_S))
    except ValueError:
        limit = RUN_TIMEOUT_S
    return limit if math.isfinite(limit) and limit > 0 else RUN_TIMEOUT_S


def run_session(sess: Any, outputs: list[str] | None, feeds: dict[str, Any],
                where: Any) -> list[Any]:
    """``sess.run`` in a worker thread, stopped (``RunOptions.terminate``) after
    :func:`run_timeout` seconds, or at once on Ctrl-C or SIGTERM.

    onnxruntime's run holds the main thread in native code, where Python cannot take a
    signal; a model that never ends (a ``Loop`` without a trip count) would ignore both.

    Raises:
        ModelError: the run took longer than the limit.
    """
    ro = ort.RunOptions()
    ro.log_severity_level = 4  # the terminate flag's own error line
    box: dict[str, Any] = {}
    done = threading.Event()  # waited on, not Thread.join: an interrupted join breaks exit

    def work() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            box["out"] = sess.run(outputs, feeds, ro)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["err"] = e
        finally:
            done.set()

    th = threading.Thread(target=work, name="kdcli-onnx-run", daemon=True)
    limit = run_timeout()
    th.start()
    finished = False
    try:
        with signals_raise_here():
            finished = done.wait(limit)
    finally:
        if not finished:  # out of time, or a signal: stop onnxruntime and wait for it
            ro.terminate = True
            done.wait()
    if not finished:
        raise ModelError(f"{where} ran longer than {limit:g} s on one batch and was stopped "
                         "(a Loop that never ends?)",
                         "Check the model; KDCLI_ONNX_TIMEOUT sets the limit in seconds")
    if "err" in box:
        raise box["err"]
    return box["out"]


def open_session(path: Any, device: str = "cpu", notes: list[str] | None = None,
                 meta: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """An onnxruntime session and the parsed graph of the model at ``path``. External data
    is checked (:func:`check_external_data`) before onnxruntime sees the model. A text
    pipeline whose ``StringNormalizer`` locale is missing runs with one that exists
    (:func:`~kdcli.teachers.onnx_text.session_with_fallback_locale`): a note saying so goes
    to ``notes`` and the locale used to ``meta["onnx_locale"]``."""
    so = ort.SessionOptions()
    so.log_severity_level = 4  # onnxruntime's own (multi-line) errors: kdcli says what failed
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own types
        raise FormatError(f"{path} is a corrupt or unsupported ONNX model ({first_line(e)})",
                          "Export it again") from e
    check_external_data(Path(path), proto)
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        if not is_locale_error(e):
            raise FormatError(f"{path} is a corrupt or unsupported ONNX model "
                              f"({onnxruntime_cause(e)})", "Export it again") from e
        sess, locale, note = session_with_fallback_locale(
            Path(path), lambda model: ort.InferenceSession(model, so, providers=providers), e)
        if notes is not None:
            notes.append(note)
        if meta is not None:
            meta["onnx_locale"] = locale
    return sess, proto.graph


def check_external_data(path: Path, proto: Any) -> None:
    """Refuse tensors whose external data is not a regular file inside the model's folder:
    an absolute path, a ``..``, a link leading out (read with ``lstat``/``readlink``, the
    target never touched), or a FIFO or device.

    Raises:
        FormatError: naming the tensor, the location and why.
    """
    for t in external_data_helper._get_all_tensors(proto):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        why = None
        if not location or "\0" in location:
            why = "is empty"
        elif Path(location).is_absolute() or location.startswith("\\") or \
                location[1:3] in (":\\", ":/"):
            why = "is an absolute path"
        elif ".." in location.replace("\\", "/").split("/"):
            why = "leads out of the model's folder (..)"
        else:
            real = inside_folder(path.parent, location)
            if real is None:
                why = "is a link that leads out of the model's folder"
            elif real.exists() and not stat.S_ISREG(real.stat().st_mode):
                why = "is not a regular file (a folder, FIFO or device)"
        if why:
            raise FormatError(
                f"External data {repr(location[:200])} of tensor "
                f"{repr(t.name[:100])} in {quote_name(path)} {why}",
                "kdcli reads external data only from regular files beside the model; copy "
                "them into its folder and save it with relative locations")
