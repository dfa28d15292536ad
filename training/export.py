"""ONNX export of the trained models, each checked against its framework before it is kept."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from training.models import CnnModel, LassoModel, Predictor, VolatilityModel

OPSET = 17
PARITY_RTOL = 1e-4  # on the predicted price, or on the volatility model's sigma


class ParityError(RuntimeError):
    pass


@dataclass(frozen=True)
class Exported:
    path: Path
    input_name: str
    output_name: str
    max_rel_error: float


def export(model: Predictor, path: Path, X_check: NDArray[np.float64]) -> Exported:
    """Write ``model`` as ONNX (raw float32 feature rows in, log return or log variance out) and
    verify parity."""
    n = X_check.shape[1]
    if isinstance(model, LassoModel | VolatilityModel):
        from skl2onnx import to_onnx

        onx = to_onnx(model.pipeline, X_check[:1].astype(np.float32), target_opset=OPSET)
        path.write_bytes(onx.SerializeToString())
    elif isinstance(model, CnnModel):
        import tensorflow as tf
        import tf2onnx

        # tf2onnx 1.17 cannot read Keras 3 models (from_keras fails); a traced function works.
        fn = tf.function(model.graph)
        spec = (tf.TensorSpec((None, n), tf.float32, name="features"),)
        tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET, output_path=str(path))
    else:
        raise TypeError(f"no ONNX export for {type(model).__name__}")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    onnx_r = np.asarray(session.run([output_name], {input_name: X_check.astype(np.float32)})[0]).ravel()
    framework_r = model.predict(X_check)
    # The relative difference of what is served, |p_onnx / p_framework - 1| (independent of the level):
    # the price, exp of the log return, or sigma, exp of half the log variance.
    served = 0.5 if isinstance(model, VolatilityModel) else 1.0
    error = float(np.max(np.abs(np.expm1(served * (onnx_r.astype(np.float64) - framework_r)))))
    if error > PARITY_RTOL:
        what = "sigma" if served != 1.0 else "the price"
        raise ParityError(
            f"{path.name}: ONNX and {model.name} disagree by {error:.2e} on {what} (> {PARITY_RTOL})"
        )
    return Exported(path, input_name, output_name, error)


@dataclass
class OnnxPredictor:
    """An exported graph used as a model, so what is evaluated is exactly what will be served."""

    path: Path
    name: str

    def __post_init__(self) -> None:
        self._session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        self._input, self._output = self._session.get_inputs()[0].name, self._session.get_outputs()[0].name

    def predict(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        """One row at a time, as the appliance runs it: a dynamically quantized graph scales its
        activations per call, so a batch would score a model that is never served."""
        rows = X.astype(np.float32)
        out = [self._session.run([self._output], {self._input: rows[i : i + 1]})[0] for i in range(len(rows))]
        return np.asarray(out, dtype=np.float64).ravel()


def quantize_int8(fp32: Path, out: Path) -> Path:
    """Dynamic int8 quantization of the weights (about 4x smaller, a little faster on a Pi)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
    return out
