"""The client wing: the lister and checker threads, the catalog, the report."""
