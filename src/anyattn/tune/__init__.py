"""`anyattn tune`: this machine's measured crossovers, cached in a small JSON file that `method="auto"`,
the blocked engine's block sizes and the neighborhood engine's tiles read (see `cache` for the file,
`keys` for what is cached, `measure` for how it is measured). Without a cache the built-in defaults stand."""
from .cache import cache_path, entry, load, lookup, save
from .keys import blocks_key, chunk_key, measured_blocks, measured_route, neighborhood_key, route_key

__all__ = ["cache_path", "entry", "load", "lookup", "save", "blocks_key", "chunk_key", "measured_blocks",
           "measured_route", "neighborhood_key", "route_key"]
