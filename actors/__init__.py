"""Where it runs: Ray actors and the protocol for what crosses actor boundaries. Never imports raysim."""
