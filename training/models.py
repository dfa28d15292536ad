"""The models: persistence (the baseline), Lasso (scikit-learn), the reference CNN (Keras), and the
volatility model (scikit-learn) whose scale every model's interval uses.

The point models predict the next candle's **log return**; the volatility model its log variance.
Scaling is part of each model (a StandardScaler in the scikit-learn pipelines; input and target
scaling around the CNN), fitted on training rows only, so the exported ONNX graphs take raw rows.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LassoCV, RidgeCV
from sklearn.model_selection import TimeSeriesSplit
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from appliance.features import FEATURE_NAMES, VAR_FLOOR, VOL_SPANS

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)
Floats = NDArray[np.float64]


class Predictor(Protocol):
    name: str

    def predict(self, X: Floats) -> Floats: ...


class Persistence:
    """ "Next close = last close": a log return of zero."""

    name = "persistence"

    def predict(self, X: Floats) -> Floats:
        return np.zeros(len(X))


@dataclass
class Shrunk:
    """A point model pulled toward zero return (persistence) by ``factor``, chosen on the training
    period: the served form of every learned model, which can then never be much worse than
    persistence even when its signal is mostly noise."""

    name: str
    model: Predictor
    factor: float

    def predict(self, X: Floats) -> Floats:
        return self.factor * self.model.predict(X)


#: What the volatility model reads besides the hour of the week (HAR-style: realized and range-based
#: variance over 1, 6, 24 and 168 candles, and trading volume, which moves with volatility).
VOL_INPUTS = (*(f"rv_{n}" for n in VOL_SPANS), *(f"gk_{n}" for n in VOL_SPANS), "volume", "volume_mean_24")
#: The columns a pooled set reads: all but the levels that belong to one product, the log price and
#: the volumes (counted in the base asset: an hour is 500 BTC, or 10^8 DOGE). What is left is log
#: ratios, returns, RSI, log variances and the calendar, which mean the same for any product.
SCALE_FREE = tuple(name for name in FEATURE_NAMES if name != "close" and not name.startswith("volume"))


def _indices(columns: Sequence[str]) -> list[int]:
    return [FEATURE_NAMES.index(name) for name in columns]


@dataclass
class VolatilityModel:
    """Ridge regression of the next candle's log Garman-Klass variance on ``VOL_INPUTS`` (scaled)
    and a one-hot hour of the week (its seasonality). The intervals' scale is exp(output / 2); its
    level does not matter, as each model's conformal multiplier absorbs it."""

    pipeline: Pipeline
    inputs: tuple[str, ...] = VOL_INPUTS
    name: str = "volatility"

    def predict(self, X: Floats) -> Floats:
        """Log variance (what the ONNX graph outputs)."""
        return np.asarray(self.pipeline.predict(X), dtype=np.float64)

    def sigma(self, X: Floats) -> Floats:
        return np.asarray(np.exp(0.5 * self.predict(X)))

    @property
    def params(self) -> dict[str, float | int | str]:
        return {"alpha": float(self.pipeline[-1].alpha_), "inputs": ",".join((*self.inputs, "hour_of_week"))}


def fit_volatility(
    X: Floats, next_gk: Floats, *, folds: int = 5, columns: Sequence[str] = FEATURE_NAMES
) -> VolatilityModel:
    """The ridge penalty by time-series cross-validation, like the Lasso's; ``VOL_INPUTS`` among
    ``columns`` only (a pooled set's leave the volumes out)."""
    inputs = tuple(name for name in VOL_INPUTS if name in columns)
    hours = OneHotEncoder(categories=[np.arange(168.0)], handle_unknown="ignore", sparse_output=False)
    design = ColumnTransformer([("scaled", StandardScaler(), _indices(inputs)),
                                ("hour_of_week", hours, [FEATURE_NAMES.index("hour_of_week")])])  # fmt: skip
    pipeline = make_pipeline(
        design, RidgeCV(alphas=np.logspace(-2, 4, 13), cv=TimeSeriesSplit(n_splits=folds))
    )
    pipeline.fit(X, np.log(next_gk + VAR_FLOOR))
    return VolatilityModel(pipeline, inputs)


@dataclass
class LassoModel:
    pipeline: Pipeline
    name: str = "lasso"

    def predict(self, X: Floats) -> Floats:
        return np.asarray(self.pipeline.predict(X), dtype=np.float64)

    @property
    def params(self) -> dict[str, float | int | str]:
        lasso = self.pipeline[-1]
        return {"alpha": float(lasso.alpha_), "nonzero_coefficients": int(np.count_nonzero(lasso.coef_))}


def fit_lasso(X: Floats, r: Floats, *, folds: int = 5, columns: Sequence[str] = FEATURE_NAMES) -> LassoModel:
    """Regularisation by time-series cross-validation (expanding windows, never the future), on
    ``columns`` (scaled) only."""
    pipeline = make_pipeline(
        ColumnTransformer([("scaled", StandardScaler(), _indices(columns))]),
        LassoCV(alphas=30, cv=TimeSeriesSplit(n_splits=folds), max_iter=20_000),
    )
    with warnings.catch_warnings():
        # The weakest penalties at the end of the path may not converge; cross-validation rejects
        # them anyway (the chosen alpha keeps a handful of coefficients), so the warnings are noise.
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline.fit(X, r)
    return LassoModel(pipeline)


@dataclass(frozen=True)
class CnnSettings:
    epochs: int = 60
    batch_size: int = 256
    patience: int = 8
    learning_rate: float = 1e-3
    seed: int = 0
    conv_filters: int = 256
    dense_units: int = 128
    columns: tuple[str, ...] = FEATURE_NAMES  # what it reads: the others enter as 0 once scaled


@dataclass
class CnnModel:
    """The network plus its scaling (fitted on training rows), applied the same way in ``predict``
    and in the exported graph (see :meth:`graph`)."""

    core: keras.Model
    x_mean: Floats
    x_std: Floats
    y_mean: float
    y_std: float
    epochs_run: int
    read: Floats  # 1 for each column it reads, 0 for the others
    name: str = "cnn"

    def graph(self, x: Any) -> Any:
        """Raw feature rows in, log returns out: works on numpy arrays and on tf tensors alike."""
        scaled = (
            (x - self.x_mean.astype(np.float32))
            / self.x_std.astype(np.float32)
            * self.read.astype(np.float32)
        )
        return self.core(scaled, training=False) * np.float32(self.y_std) + np.float32(self.y_mean)

    def predict(self, X: Floats) -> Floats:
        return np.asarray(self.graph(X.astype(np.float32)), dtype=np.float64).ravel()

    @property
    def params(self) -> dict[str, float | int | str]:
        return {"epochs_run": self.epochs_run, "parameters": int(self.core.count_params())}


def fit_cnn(X_fit: Floats, r_fit: Floats, X_val: Floats, r_val: Floats, settings: CnnSettings) -> CnnModel:
    """The reference CNN: Conv1D(256, 4) -> Flatten -> Dense(128, relu) -> Dense(128) -> Dense(1).

    Early stopping watches the validation rows (the end of the training period), never the hold-out.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()
    read = np.isin(FEATURE_NAMES, settings.columns).astype(np.float64)
    x_mean, x_std = X_fit.mean(axis=0), np.maximum(X_fit.std(axis=0), 1e-12)
    y_mean, y_std = float(r_fit.mean()), float(r_fit.std())
    n = X_fit.shape[1]
    core = keras.Sequential([
        keras.Input((n,), name="features"),
        keras.layers.Reshape((n, 1)),
        keras.layers.Conv1D(settings.conv_filters, 4, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(settings.dense_units, activation="relu"),
        keras.layers.Dense(settings.dense_units),
        keras.layers.Dense(1),
    ])  # fmt: skip
    core.compile(optimizer=keras.optimizers.Adam(settings.learning_rate), loss=keras.losses.Huber())
    stop = keras.callbacks.EarlyStopping(patience=settings.patience, restore_best_weights=True)
    started = time.monotonic()
    history = core.fit(
        ((X_fit - x_mean) / x_std * read).astype(np.float32), ((r_fit - y_mean) / y_std).astype(np.float32),
        validation_data=(((X_val - x_mean) / x_std * read).astype(np.float32),
                         ((r_val - y_mean) / y_std).astype(np.float32)),
        epochs=settings.epochs, batch_size=settings.batch_size, shuffle=True,
        callbacks=[stop, _epoch_log_class()(settings.epochs)], verbose=0,
    )  # fmt: skip
    epochs_run = len(history.history["loss"])
    log.info("cnn trained", extra={"epochs": epochs_run, "seconds": round(time.monotonic() - started, 1)})
    return CnnModel(core, x_mean, x_std, y_mean, y_std, epochs_run, read)


def _epoch_log_class() -> type:
    import keras

    class EpochLog(keras.callbacks.Callback):  # type: ignore[misc]
        """One log line per epoch: training progress without Keras' progress bars."""

        def __init__(self, epochs: int) -> None:
            super().__init__()
            self.epochs = epochs

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            log.info(
                "cnn epoch",
                extra={
                    "epoch": f"{epoch + 1}/{self.epochs}",
                    "loss": round(logs.get("loss", 0.0), 5),
                    "val_loss": round(logs.get("val_loss", 0.0), 5),
                },
            )

    return EpochLog
