"""Small networking helpers shared by every protocol: routes, addresses, HTTP."""
