"""`python -m pipeline` is the same command as `mailwarden`."""

from pipeline.cli import main

main()
