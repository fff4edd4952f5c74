"""The Debian test workloads: see testimages.py."""
