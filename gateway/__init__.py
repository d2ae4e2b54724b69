"""The aiohttp gateway: validates, admits and enqueues requests, relays their output."""
