"""The inspector of HTTP tunnels: every request and response through the tunnel, live,
with replay (``natkit expose --http`` serves it on http://127.0.0.1:4040).

- :mod:`~natkit.inspect.exchange`: HTTP/1.1 exchanges from a connection's bytes (sans-I/O);
- :mod:`~natkit.inspect.store`: the captured records, a ring buffer capped in bytes;
- :mod:`~natkit.inspect.tap`: the copy of one visitor connection's bytes, parsed off the
  data path;
- :mod:`~natkit.inspect.replay`: a request sent again to the local service, as captured or
  changed;
- :mod:`~natkit.inspect.views` and :mod:`~natkit.inspect.server`: the JSON (ngrok's agent
  API shape) and the local web server with the page (``static/``).

docs/inspector.md tells how to use it.
"""
