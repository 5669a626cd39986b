"""Test and benchmark support: gateways in threads or processes, rounds opened by hand."""
