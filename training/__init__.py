"""Training pipeline: datasets, CNN and Lasso models, evaluation, ONNX export and the model registry."""
