"""One module per resource; each router declares its prefix, tags and the scope it requires."""
