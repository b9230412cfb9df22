"""Stage functions: plain ``stage(cfg) -> StageResult`` callables; the CLI only parses and calls them."""
