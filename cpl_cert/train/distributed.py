"""Data-parallel training across processes started by ``torchrun``: the process group of ``cpl_cert.distributed``."""

from ..distributed import DistInfo, all_reduce_sum, barrier, env_info, setup, teardown, weights_match

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "env_info", "setup", "teardown", "weights_match"]
