"""The modality names every part shares, in their canonical order.

One list for the shard format (a sample's members, manifest counts), the towers (model_zoo: parameter order, so every
rank builds identical parameters) and the objectives (pretrain). It lives in ``medfm.schema`` because shards and
model_zoo both need it and neither imports the other's internals.
"""

MODALITIES = ("image", "volume", "signal", "ehr", "text")
