"""What the benchmarks share: the machine record, the datasets, the eval, the FLOP counts."""
