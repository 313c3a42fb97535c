"""Entry package: ``python -m deploy`` (multi-stream detection + intrusion zones) and ``python -m deploy.benchmark``.

Thin wrappers run from the repository root; the logic lives in :mod:`sidnet.runtime`.
"""
