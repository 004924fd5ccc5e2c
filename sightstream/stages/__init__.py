"""The pipeline's stages, one module each, joined only by bounded asyncio queues."""
