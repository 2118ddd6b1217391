"""medfm.shards"""
