"""The HTTP gateway (`lmforge serve http`): the web console, an OpenAI-compatible API and
its own /metrics, as a plain gRPC client of the API and inference servers."""
