"""The seed side: warm up a workload, capture its cache, publish it; the daemon."""
