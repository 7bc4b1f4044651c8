"""``torch.export.save`` programs (``.pt2``) as teachers (the ``torch.export`` format).

The program's input spec gives the input's dtype, its per-example shape (where every size is
fixed) and a fixed batch size (where the batch axis is not dynamic). Archives are checked by
:func:`kdcli.teachers.safety.check_export_archive` before torch reads them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdcli.errors import FormatError, ModelError, first_line
from kdcli.teachers.base import (
    InputSpec,
    LoadRequest,
    Teacher,
    TeacherFormat,
    torch_runner,
)
from kdcli.teachers.safety import check_export_archive, zip_names


class TorchExportFormat(TeacherFormat):
    """A ``torch.export.save`` archive."""

    name = "torch.export"

    def detect(self, path: Path) -> bool:
        return any(n.endswith("archive_format") or n.endswith("serialized_exported_program.json")
                   for n in zip_names(path))

    def load(self, req: LoadRequest) -> Teacher:
        p = req.path
        check_export_archive(p, req.opts.trust_pickle)
        try:
            ep = torch.export.load(str(p))
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"{p} is a corrupt torch.export program ({first_line(e)})",
                              "Save it again with torch.export.save") from e
        user_inputs = list(ep.graph_signature.user_inputs)
        if len(user_inputs) != 1:
            raise ModelError(f"{p} takes {len(user_inputs)} inputs",
                             "kdcli teachers take one input")
        spec, fixed_batch = _input_spec(ep, user_inputs[0], req.user_shape)
        # exported programs are already in inference form: no eval()
        runner, module = torch_runner(ep.module(), req.device, req.precision, eval_mode=False)
        return req.teacher(self, runner, module=module, inputs=(spec,),
                           fixed_batch=fixed_batch)


def _input_spec(ep: torch.export.ExportedProgram, name: str,
                user_shape: tuple[int, ...] | None) -> tuple[InputSpec, int | None]:
    """The input ``name`` of the program (the user's shape wins), and its fixed batch size."""
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name == name:
            val = node.meta.get("val")
            if val is not None:
                dims = list(val.shape)
                fixed = int(dims[0]) if isinstance(dims[0], int) else None
                rest = dims[1:]
                shape = user_shape or (tuple(int(d) for d in rest)
                                       if all(isinstance(d, int) for d in rest) else None)
                return InputSpec(name, str(val.dtype).removeprefix("torch."), shape), fixed
    return InputSpec(name, shape=user_shape), None


FORMAT = TorchExportFormat()
