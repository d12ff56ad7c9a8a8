"""Fixtures of the op-family tests (the shared functions are in ``common.py``)."""

import pytest


@pytest.fixture
def small_tiles(monkeypatch):
    """Triton tiles of 256 bytes and channel blocks of 4 (BLOCK_R = 16 float32, 8 float64
    rows): R = 37 takes three or five row tiles, C = 5 two channel blocks, so the
    accumulation loops and partial blocks of the BatchNorm, conv and max-pool kernels run at
    test sizes."""
    from imaml_kernels.triton import batchnorm, conv, maxpool

    monkeypatch.setattr(batchnorm, "BN_TILE_BYTES", 256)
    monkeypatch.setattr(batchnorm, "BN_TBWD_TILE_BYTES", 256)
    monkeypatch.setattr(batchnorm, "BN_MAX_BLOCK_C", 4)
    monkeypatch.setattr(conv, "CONV_TILE_BYTES", 256)
    monkeypatch.setattr(conv, "CONV_MAX_BLOCK_C", 4)
    monkeypatch.setattr(maxpool, "POOL_TILE_BYTES", 256)
    monkeypatch.setattr(maxpool, "POOL_MAX_BLOCK_C", 4)
