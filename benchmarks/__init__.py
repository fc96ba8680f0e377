"""The benchmark harness behind `ds-grace bench` and `ds-grace demo` (installed with ds_grace; see README.md)."""
