"""`fusedata explore`: Bohdi synthetic data by domain-tree exploration."""
