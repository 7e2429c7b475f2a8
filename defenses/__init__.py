"""Defense plugins: one module per defense, each registered in `bench.builtins`."""
