"""The operator's surface: the admin API (api.py), Prometheus metrics (metrics.py), the
dashboard page (ui.py and ui/) and the client the CLI drives the API with (client.py)."""
