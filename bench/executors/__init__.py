"""Executors run planned cells: in-process / process pool locally, or Ray across machines."""
