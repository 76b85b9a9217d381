"""mailwarden dashboards (built in a later issue)."""
