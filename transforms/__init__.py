"""Reusable Beam transforms of beamvision and the plain functions they call."""
