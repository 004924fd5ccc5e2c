"""Models: the catalogue of family/variant entries, the manager that loads them onto devices,
and the adapters (one file per family) behind one small protocol."""
