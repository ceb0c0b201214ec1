"""asv benchmark suites (see benchmark_*.py); the device check lives in gpu/."""
