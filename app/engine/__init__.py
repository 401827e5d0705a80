"""The step runtime: runs one step of one task under a lease, and the sweeps that keep tasks moving."""
