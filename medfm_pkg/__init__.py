"""medfm: distributed pretraining of multimodal medical foundation models.

The parts live in their own folders (medfm.shards, medfm.model_zoo, medfm.pretrain, medfm.launch,
medfm.evals, medfm.schema); this file only names the package and its version.
"""

__version__ = "0.1.0"
