"""Experiment entry points and config files (project code on top of the mmjax library)."""
