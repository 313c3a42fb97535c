"""``python -m export``: the export entry point (see ``export/__main__.py``); the library is :mod:`sidnet.export`."""
