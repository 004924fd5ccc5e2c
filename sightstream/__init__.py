"""sightstream: vision models on live video over Redis Streams."""

__version__ = "0.1.0"
