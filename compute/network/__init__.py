"""Node-side networking: tenant bridges, taps and veths (pyroute2)."""
