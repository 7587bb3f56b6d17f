"""After training: the model outside the shard format. `capsdist predict` classifies image
files (and shards) with exported weights; `capsdist export` writes an ONNX or torch.export
program and checks it against eager evaluation. Both read the run directory, never the loop."""

from capsdist.serve.export import run_export
from capsdist.serve.model import ServingModel, load_serving_config
from capsdist.serve.predict import run_predict

__all__ = ["ServingModel", "load_serving_config", "run_export", "run_predict"]
