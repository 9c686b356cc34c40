"""What decides where traffic goes: routing-state changes from the admin API and the CLI
(changes.py), health checks (health.py), the rollout controller (rollout.py) and the events
every decision emits (events.py)."""
