"""Deployment of the FIRM reward server beyond one process (Ray Serve)."""
