"""Compute-node side of Skyport: drivers, networking and node tasks.

Nothing in this package imports Django or ``portal``; the only contract with
the control plane is :mod:`compute.spec`.
"""
