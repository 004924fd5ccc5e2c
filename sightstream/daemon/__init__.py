"""Assembling the stages into a running daemon: lifecycle, signals, embedded Redis."""
