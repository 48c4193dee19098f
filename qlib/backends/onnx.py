"""The ONNX Runtime backend: an encoder classifier exported to ONNX, ONNX Runtime's INT8 quantization (dynamic and
static), and a runner with the transformers call signature."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlib.core.errors import QlabError

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_onnx(model: torch.nn.Module, example: dict[str, torch.Tensor], path: str | Path) -> Path:
    """FP32 ONNX of a sequence classifier, batch and sequence dynamic (TorchScript exporter)."""
    names = [n for n in ENCODER_INPUTS if n in example]
    axes = {n: {0: "batch", 1: "seq"} for n in names} | {"logits": {0: "batch"}}
    tmp = Path(path).with_suffix(".export.tmp")  # same folder: the rename below is atomic
    try:
        torch.onnx.export(model.eval(), tuple(example[n] for n in names), str(tmp), input_names=names,
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
        os.replace(tmp, path)
    except Exception as e:
        raise QlabError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return Path(path)


def ort_quantize_dynamic(src: str | Path, dst: str | Path, per_channel: bool = True) -> Path:
    """onnxruntime.quantization dynamic INT8 (int8 weights of MatMul/Gemm, activations at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    return Path(dst)


class _Reader:
    """onnxruntime CalibrationDataReader over tokenized batches."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]]):
        self._it: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def ort_quantize_static(src: str | Path, dst: str | Path, batches: Iterable[dict[str, np.ndarray]],
                        per_channel: bool = True) -> Path:
    """Static INT8 (QDQ) with calibrated activation ranges, on MatMul/Gemm only.

    Quantizing every op also quantizes the attention-mask arithmetic (large negative constants),
    which collapsed accuracy to chance here; restricting to the matrix products and the embedding
    lookups (Gather) keeps it.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reader = type("Reader", (_Reader, CalibrationDataReader), {})(batches)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    with tempfile.TemporaryDirectory() as work, contextlib.chdir(work):  # ORT writes scratch files to cwd
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["MatMul", "Gemm", "Gather"])
    return dst


class OrtClassifier:
    """An ONNX Runtime session that looks like the HF classifier to qlib's predict/latency code."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        # ORT's pool spin-waits after each run; on 2 cores that starves PyTorch's threads measured
        # next to it (torch FP32 went 93 -> 151 ms at batch 8 here). Off, both get the cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise QlabError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **batch: Any) -> Any:
        feed = {n: _numpy(batch[n]) for n in self.inputs}
        logits = torch.from_numpy(self.session.run(["logits"], feed)[0])
        return type("Out", (), {"logits": logits})()

    # the bits of nn.Module that predict()/latency call
    def to(self, *_: Any) -> OrtClassifier:
        return self

    def eval(self) -> OrtClassifier:
        return self


def _numpy(x: Any) -> np.ndarray:
    return x.cpu().numpy().astype(np.int64) if isinstance(x, torch.Tensor) else np.asarray(x, np.int64)
