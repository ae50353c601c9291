"""Verbs on storage drivers."""
