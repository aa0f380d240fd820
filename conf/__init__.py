"""Hydra config tree (a package so that installed apps find it as memfilter.conf)."""
