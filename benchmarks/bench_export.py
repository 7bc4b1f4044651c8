"""onnxruntime against torch eager on an exported 784-300-300-10 student."""

import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
from common import median_of, report

from kdcli.data.sources import load_data
from kdcli.export import main_export
from kdcli.preprocessing import Preprocessing
from kdcli.students.base import Architecture, build_model
from kdcli.students.model_file import save_model


def main() -> None:
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    arch = Architecture.parse("mlp:300,300")
    pre = Preprocessing(255.0, 0.1307, 0.3081, [28, 28], "pixel values 0-255")
    model = build_model(arch, pre, 10).eval()
    path = tmp / "student.safetensors"
    save_model(path, model, arch, pre, 10, {"data": "mnist:test"})
    onnx_path = tmp / "student.onnx"
    main_export(path, onnx_path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    x = load_data("mnist:test[:1024]").inputs.float()
    rows, result = [], {}
    for batch, repeats in ((1, 2000), (1024, 50)):
        xb, xn = x[:batch], x[:batch].numpy()

        def run_torch(xb=xb):
            with torch.inference_mode():
                model(xb)

        t_torch = median_of(run_torch, repeats)
        t_ort = median_of(lambda xn=xn: sess.run(None, {"input": xn}), repeats)
        result[f"batch{batch}"] = {"torch_ms": t_torch * 1e3, "ort_ms": t_ort * 1e3,
                                   "torch_samples_per_s": batch / t_torch,
                                   "ort_samples_per_s": batch / t_ort,
                                   "ort_speedup": t_torch / t_ort}
        rows.append((f"batch {batch}: torch eager", f"{t_torch * 1e3:.3f} ms  "
                     f"{batch / t_torch:,.0f} samples/s"))
        rows.append((f"batch {batch}: onnxruntime", f"{t_ort * 1e3:.3f} ms  "
                     f"{batch / t_ort:,.0f} samples/s  ({t_torch / t_ort:.2f}x torch)"))
    report("exported student latency", rows, result)


if __name__ == "__main__":
    main()
