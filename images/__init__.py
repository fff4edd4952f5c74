"""Offline builders of Skyport's sample and test images (Debian packages, no registry)."""
