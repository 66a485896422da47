"""A shim, to be deleted once server.py, ops.py and sessions.py import these from storm_service.endpoints."""

from storm_service.endpoints import AUTHORIZED_DIR, SERVER_SECRET_FILE, default_endpoint, pid_alive, pid_namespace

__all__ = ["AUTHORIZED_DIR", "SERVER_SECRET_FILE", "default_endpoint", "pid_alive", "pid_namespace"]
