"""medfm.model_zoo"""
