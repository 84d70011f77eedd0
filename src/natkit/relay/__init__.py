"""Relay tunnels: a self-hosted ngrok (``natkit relay serve`` + ``natkit expose --relay``)."""
