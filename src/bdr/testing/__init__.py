"""Test machinery that ships in the package: the ring-file producer the host tests, benchmarks and demo use."""
