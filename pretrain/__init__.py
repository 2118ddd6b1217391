"""medfm.pretrain"""
