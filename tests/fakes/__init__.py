"""Scripted fakes that speak the real protocols: providers, backends."""
