"""mailwarden API: the HTTP face of the store (alerts, events, stats, plots, push ingest, metrics)."""
