"""Processes: a supervisor with N workers on one port (supervisor.py, worker.py), the state they
share (shared.py), and the hot-restart hand-over of sockets and state (handover.py)."""
