"""Helpers the support folders share (shell: lib/service.sh; Python: service.py)."""
