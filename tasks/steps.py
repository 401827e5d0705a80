"""The step runner task (``outlast.run_step``)."""
