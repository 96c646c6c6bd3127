"""Benchmarks: ``python -m jaxrl_llm.bench`` (see its ``--help``)."""
