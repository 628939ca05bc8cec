"""Benchmark suites (placeholder until the suite registry from main lands; ember.bench.optim is the optimizer suite)."""
