"""Simulated cohorts with known ground truth, written as real SOMA experiments and h5ad
files (the tests, the demo and the quality benchmark use them)."""
