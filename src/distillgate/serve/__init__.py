"""Serving: an OpenAI-compatible gateway on loopback in front of model backends, with sticky A/B assignment,
a request log in the run store (:mod:`.log`), shadow calls and hot swap. Heavy imports stay in submodules."""
