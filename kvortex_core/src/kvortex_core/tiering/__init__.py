"""Tiering: ordered tiers, write-behind, promotion, demotion and failure isolation."""
