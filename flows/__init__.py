"""Prefect flows: composition only. The work lives in ``tasks``."""
