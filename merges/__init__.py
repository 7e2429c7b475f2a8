"""Merge methods: one module per method family, each registered in `bench.builtins`."""
