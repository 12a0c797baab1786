"""Imported by Python at start-up when tests put this directory on PYTHONPATH (tests/faults.py: env)."""

from tests.faults import install_from_env

install_from_env()
