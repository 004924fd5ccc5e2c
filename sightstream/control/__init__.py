"""The aiohttp control plane: thin handlers over the objects the pipeline uses."""
