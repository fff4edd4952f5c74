"""Interactive consoles: single-use tickets, the WebSocket relay (ASGI) and non-interactive exec.

See docs/console.md for the design: the browser or an API client redeems a
ticket at the relay (``/ws/console/<ticket>/``); the relay asks the node for a
console hub and moves bytes between the WebSocket and the hub's Redis streams.
"""
