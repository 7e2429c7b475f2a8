"""Attack plugins: one module per attack, each registered in `bench.builtins`."""
