"""The built-in agents (``builtin/``), written with the public SDK like any other."""
