"""Task definitions and the named suites."""
