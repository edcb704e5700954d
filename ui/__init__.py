"""``postsim ui``: a small local web page over a running server (aiohttp, the asyncio client, no build step)."""
