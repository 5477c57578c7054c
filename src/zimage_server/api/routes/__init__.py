"""One module per group of routes; ``api.main`` attaches them all."""
