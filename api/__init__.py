"""mailwarden api (built in a later issue)."""
