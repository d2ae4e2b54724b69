"""Shared by gateway and worker: settings, wire protocol, Redis keys and scripts, errors, logging."""
