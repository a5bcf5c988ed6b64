"""Workloads: the kinds of model a study tunes (``base``: the contract; ``classifier``,
``detector``: the implementations; ``registry``: which one runs a config).

Nothing is imported here, so a stage function can import the contract without loading
every implementation.
"""
