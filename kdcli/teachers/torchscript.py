"""TorchScript archives (``torch.jit.save``) as teachers (the ``torchscript`` format)."""

from __future__ import annotations

from pathlib import Path

import torch

from kdcli.errors import FormatError, first_line
from kdcli.teachers.base import LoadRequest, Teacher, TeacherFormat, torch_runner
from kdcli.teachers.safety import zip_names


class TorchScriptFormat(TeacherFormat):
    """A ``torch.jit.save`` archive: a zip with the model's code."""

    name = "torchscript"

    def detect(self, path: Path) -> bool:
        names = zip_names(path)
        return any("/code/" in n for n in names) or any(n.endswith("constants.pkl")
                                                        for n in names)

    def load(self, req: LoadRequest) -> Teacher:
        try:
            module = torch.jit.load(str(req.path), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - torch raises many kinds here
            raise FormatError(f"{req.path} is a corrupt TorchScript archive ({first_line(e)})",
                              "Save it again with torch.jit.save") from e
        runner, module = torch_runner(module, req.device, req.precision)
        return req.teacher(self, runner, module=module)


FORMAT = TorchScriptFormat()
