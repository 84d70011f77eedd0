"""``natkit-ngrok``: natkit as the agent behind pyngrok (and anything else that drives the
ngrok agent's command line and local API).

pyngrok starts its agent as ``ngrok start --none --log stdout --config FILE``, reads the log
lines for the local API's address and the session, then drives that API. This package
speaks all of it and opens the tunnels on a self-hosted natkit relay:
``PyngrokConfig(ngrok_path=shutil.which("natkit-ngrok"))``. See docs/compat-pyngrok.md.
"""
