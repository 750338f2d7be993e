"""Fault-injection helpers: the invariant checker, fault tools and the scenario report (issue 6)."""
