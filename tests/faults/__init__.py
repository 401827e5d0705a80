"""Fault tests: each guarantee of RUNTIME.md proved by making its fault happen for real."""
