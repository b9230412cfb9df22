"""Stage functions: plain ``stage(cfg) -> dict`` callables; the CLI only parses and calls them."""
