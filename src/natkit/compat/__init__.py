"""Drop-ins for the libraries people start from: their calls, served by natkit."""
