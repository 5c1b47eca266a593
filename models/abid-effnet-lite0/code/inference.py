"""Entry point of the SageMaker PyTorch serving container: the four functions of ml.inference."""

from ml.inference import input_fn, model_fn, output_fn, predict_fn

__all__ = ["input_fn", "model_fn", "output_fn", "predict_fn"]
