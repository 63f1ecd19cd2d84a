"""``sfvideo serve``: real-time streaming of a generator to a browser page, with prompt switching.

- ``session``: the adapter to the generation code (``ServeGenerator``, ``StreamSession``), the only module here
  that imports it;
- ``server``: the aiohttp application (page, WebSocket protocol, stream slots, downloads);
- ``recording``: the downloadable mp4 of a stream, on disk;
- ``command``: the command line; ``measure``: the frame-encoding latency measurement of docs/serve.md;
- ``static/``: the page (plain HTML, JS and CSS, no build step).
"""
