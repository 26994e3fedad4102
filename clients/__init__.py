"""Clients of the Triton ranking endpoint."""
