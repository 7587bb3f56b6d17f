"""Benchmarks: model step throughput and data reader throughput (`capsdist bench ...`)."""
