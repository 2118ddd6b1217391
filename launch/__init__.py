"""medfm.launch"""
