"""medfm.evals"""
