"""Training pipeline: datasets, CNN and Lasso models, evaluation, ONNX export and the model registry."""

#: The promotion gate's defaults: a served model's hold-out MAE may be at most GATE_MARGIN (relative) worse
#: than persistence's, and not significantly worse (one-sided Diebold-Mariano p below GATE_P).
GATE_MARGIN = 0.002
GATE_P = 0.05
#: What ``python -m training train`` (and a release) exits with when the gate refuses a version.
EXIT_GATE_REFUSED = 3
