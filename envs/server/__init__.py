"""The FastAPI env server (sessions over HTTP) and its httpx client, `RemoteEnv`."""
